"""Prefix caching (issue 18): the block pool and prefix index as plain Python, then whole engines on tiny models
with the cache on against the same engine options with it off: greedy tokens identical and logits within 1e-5
for hits at every grid position, after eviction, with MTP, with concurrent requests sharing a prefix, and when
the prefix's first owner is aborted mid-prefill."""

import pytest
import torch

from deltaserve import LLMEngine, SamplingParams
from deltaserve.cache.kv_blocks import BlockPool
from deltaserve.cache.prefix_cache import PrefixCache, chain_hashes
from deltaserve.cache.state_cache import KV_BLOCK, HybridCache
from deltaserve.config import ModelConfig
from deltaserve.engine.kv_manager import KVManager
from deltaserve.engine.sequence import Sequence
from drive import drive
from tiny_models import add_mtp_weights, save_hf_model, tiny_config

BS = 4  # block size of the bookkeeping tests


# ------------------------------------------------------------------ bookkeeping, no model ----

def test_pool_hands_out_empty_blocks_before_evicting_cached_ones_least_recently_used_first():
    pool = BlockPool(4)
    a, b, c, d = (pool.allocate() for _ in range(4))
    with pytest.raises(RuntimeError, match="all 4 KV blocks"):
        pool.allocate()
    pool.register(a, b"ha")
    pool.register(b, b"hb")
    pool.register(c, b"ha")  # a hash already indexed keeps its block
    assert pool.by_hash == {b"ha": a, b"hb": b} and pool.num_free == 0
    for blk in (b, c, a, d):
        pool.release(blk)
    assert pool.num_free == 4 and pool.num_cached == 2
    assert [pool.allocate(), pool.allocate()] == [c, d]  # empty ones first
    assert pool.allocate() == b and b"hb" not in pool.by_hash  # then the least recently released cached one
    pool.take(a)  # a cached block comes back into use: no longer evictable
    assert pool.refs[a] == 1 and pool.num_free == 0
    with pytest.raises(RuntimeError, match="not referenced"):
        pool.release(d) or pool.release(d)


def test_take_of_a_free_block_without_contents_is_refused():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError, match="holds nothing"):
        pool.take(1)


def sequence_blocks(pool: BlockPool, n_tokens: int) -> list[int]:
    return [pool.allocate() for _ in range(-(-n_tokens // BS))]


def test_a_hit_needs_both_the_snapshot_and_every_full_block_below_it():
    pool = BlockPool(32)
    cache = PrefixCache(pool, BS, slots=[100, 101, 102])
    tokens = list(range(1, 15))  # 14 tokens: 3 full blocks and 2 more
    blocks = sequence_blocks(pool, len(tokens))
    snap8 = cache.capture(tokens[:8], blocks)
    snap14 = cache.capture(tokens, blocks)
    assert cache.capture(tokens[:8], blocks) is None  # cached already
    assert snap8.partial_block is None and snap14.partial_block == blocks[3] and pool.refs[blocks[3]] == 2
    hit, matched = cache.lookup(tokens + [99], limit=14)
    assert (hit.length, hit.blocks, hit.snapshot, matched) == (14, blocks[:3], snap14, 12)
    assert cache.lookup(tokens[:13] + [7, 7], limit=14)[0].length == 8  # the tail differs: back to the 8-token one
    assert cache.lookup(tokens + [99], limit=13)[0].length == 8  # no longer than the limit
    assert cache.lookup([5] + tokens, limit=14) == (None, 0)
    assert cache.lookup(tokens[:9] + [7] * 6, limit=14)[1] == 8  # KV matches 2 blocks, whatever the snapshots
    for b in blocks:  # the sequence ends; blocks 0-2 stay cached, block 3 is held by the 14-token snapshot
        pool.release(b)
    assert pool.refs[blocks[3]] == 1
    for _ in range(pool.num_free):  # evict every unreferenced block: the KV below both snapshots is gone
        pool.allocate()
    assert cache.lookup(tokens + [99], limit=14) == (None, 0)


def test_snapshots_are_evicted_least_recently_used_first_and_release_their_block():
    pool = BlockPool(32)
    cache = PrefixCache(pool, BS, slots=[7, 8])
    seqs = [[s] * 6 for s in (1, 2, 3)]
    blocks = [sequence_blocks(pool, 6) for _ in seqs]
    first = cache.capture(seqs[0], blocks[0])
    second = cache.capture(seqs[1], blocks[1])
    assert cache.lookup(seqs[0] + [0], 6)[0].snapshot is first  # touches the first: the second is now oldest
    third = cache.capture(seqs[2], blocks[2])
    assert third.slot == second.slot and cache.lookup(seqs[1] + [0], 6)[0] is None
    assert pool.refs[blocks[1][1]] == 1  # the evicted snapshot's partial block: back to its sequence only
    assert {s.length for s in cache.entries.values()} == {6}


def test_chain_hashes_cover_everything_before():
    a, b = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, 2), chain_hashes([1, 2, 3, 9, 5, 6, 7, 8], 4, 2)
    assert a[0] != b[0] and a[1] != b[1]  # the second block's tokens are equal, what came before is not


# ------------------------------------------------------------------ engines, cache on vs off ----

def test_snapshots_are_copied_together_before_the_next_step_or_a_hit_reads_them():
    """KVManager defers a step's snapshot copies to one batched copy per dtype (bf16 conv windows, float32
    delta-rule states) at flush; a snapshot slot captured twice takes the last capture; an admission whose hit
    reads a snapshot not copied yet copies the pending ones first."""
    cfg = ModelConfig.from_dict(dict(tiny_config("qwen3_next"), model_type="qwen3_next"))
    cache = HybridCache(cfg, 4, 64, torch.bfloat16, extra_state_slots=2)
    g = torch.Generator().manual_seed(0)
    for i in cfg.gdn_layers:
        for t in cache.layer(i):
            t.copy_(torch.randn(t.shape, generator=g))
    kv = KVManager(cache, 64, 0, [4, 5], grid=32)

    def running(slot: int, tokens: list[int]) -> Sequence:
        seq = Sequence(f"s{slot}", tokens, SamplingParams(max_tokens=4), 4)
        seq.slot = slot
        assert kv.admit(seq)
        kv.extend(seq, len(tokens))
        seq.num_computed = len(tokens)
        return seq

    def state(slot: int) -> list[torch.Tensor]:
        return [t[slot].clone() for i in cfg.gdn_layers for t in cache.layer(i)]

    a, b = running(0, rand_tokens(2 * KV_BLOCK, 1)), running(1, rand_tokens(2 * KV_BLOCK, 2))
    want_a, want_b = state(0), state(1)
    before = state(4) + state(5)
    kv.snapshot(a, 2 * KV_BLOCK)
    kv.snapshot(b, 2 * KV_BLOCK)
    assert all(torch.equal(x, y) for x, y in zip(state(4) + state(5), before))  # nothing copied yet
    kv.flush()
    for seq, want in ((a, want_a), (b, want_b)):  # each snapshot holds its owner's state
        snap = kv.prefix.lookup(seq.prompt_ids + [7], len(seq.prompt_ids))[0].snapshot
        assert snap.slot in (4, 5) and all(torch.equal(x, y) for x, y in zip(state(snap.slot), want))
    c = running(2, rand_tokens(2 * KV_BLOCK, 3))
    kv.snapshot(c, 2 * KV_BLOCK)  # evicts the least recently used snapshot and takes its slot: a pending copy
    want_c = state(2)
    cache.layer(cfg.gdn_layers[0])[1][2].zero_()  # slot 2 moves on before anything copies: the copy reads it then
    hit = Sequence("again", c.prompt_ids + [1, 2, 3], SamplingParams(max_tokens=4), 4)
    hit.slot = 3
    taken = kv.prefix.lookup(hit.prompt_ids, len(hit.prompt_ids) - 1)[0].snapshot.slot
    assert kv.admit(hit) and hit.num_computed == 2 * KV_BLOCK  # the hit copies the pending snapshot first
    assert all(torch.equal(x, y) for x, y in zip(state(3), state(taken)))
    assert torch.equal(state(3)[1], state(2)[1])
    assert not torch.equal(state(3)[1], want_c[1])  # the state at the copy, not at capture (flush is the contract)


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    return save_hf_model("qwen3_next", tmp_path_factory.mktemp("prefix"), seed=3)


def make(path, cache: bool, np_=4, chunk=32, k=0, **kw):
    """chunk: the prefill grid (max_num_batched_tokens - max_num_seqs * (1 + k))."""
    return LLMEngine.from_pretrained(path, dtype="float32", max_num_seqs=np_, max_model_len=512,
                                     max_num_batched_tokens=chunk + np_ * (1 + k), spec_tokens=k,
                                     enable_prefix_caching=cache, **kw)


def same(a: dict, b: dict, rids) -> None:
    for rid in rids:
        assert a[rid][0] == b[rid][0], rid
        torch.testing.assert_close(a[rid][1], b[rid][1], rtol=0, atol=1e-5)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0)


def rand_tokens(n: int, seed: int, vocab: int = 256) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_chats_next_turn_costs_only_its_new_tokens(next_dir):
    on, off = make(next_dir, True), make(next_dir, False)
    history = rand_tokens(50, 1)
    for turn in range(4):
        rid = f"t{turn}"
        a, b = drive(on, [(rid, history, greedy(6), 0, None)]), drive(off, [(rid, history, greedy(6), 0, None)])
        same(a, b, [rid])
        history = history + a[rid][0] + rand_tokens(9, 10 + turn)  # the reply, then the user's next message
    st = on.prefix_cache_stats()
    assert st["hits_total"] == 3 and off.prefix_cache_stats()["hits_total"] == 0
    # every later turn resumed at the end of the previous one (its prompt + output but the last, unfed token)
    assert st["cached_tokens_total"] == sum(50 + 15 * t + 5 for t in range(3))


def test_hits_at_every_grid_position_match_the_uncached_run(next_dir):
    on, off = make(next_dir, True, chunk=32, prefix_cache_slots=32), make(next_dir, False, chunk=32)
    shared = rand_tokens(140, 2)
    drive(on, [("seed", shared, greedy(1), 0, None)])  # grid snapshots at 32, 64, 96, 128; its end at 140
    cached = []
    for cut in (33, 64, 65, 97, 128, 129, 140):
        reqs = [(f"c{cut}", shared[:cut] + rand_tokens(5, cut), greedy(4), 0, None)]
        same(drive(on, reqs), drive(off, reqs), [reqs[0][0]])
        cached.append(on.kv.stats.cached_tokens)
    gained = [b - a for a, b in zip([0] + cached, cached)]
    assert gained == [32, 64, 64, 96, 128, 128, 140]  # the last snapshot at or below each cut


def test_a_shared_prefix_no_request_ended_at_is_learned_at_a_branch_point(next_dir):
    """A system prompt of 100 tokens with different questions after it: the first request leaves no snapshot inside
    it (grid 128); the second matches its KV up to 96 and splits its prefill at the branch point 64, snapshotting
    there; the third resumes at 64. Every output equals the uncached run's."""
    on, off = make(next_dir, True, chunk=128), make(next_dir, False, chunk=128)
    system = rand_tokens(100, 5)
    gained = []
    for i in range(3):
        reqs = [(f"q{i}", system + rand_tokens(20, 50 + i), greedy(4), 0, None)]
        before = on.kv.stats.cached_tokens
        same(drive(on, reqs), drive(off, reqs), [reqs[0][0]])
        gained.append(on.kv.stats.cached_tokens - before)
    assert gained == [0, 0, 64]


def test_eviction_concurrency_and_an_aborted_owner(next_dir):
    """Two snapshot slots under five prefixes; requests sharing a prefix arrive together and staggered; the first
    owner of a prefix is aborted mid-prefill (its grid snapshot stays and serves the next)."""
    on = make(next_dir, True, prefix_cache_slots=2)
    off = make(next_dir, False)
    prefixes = [rand_tokens(70, 20 + i) for i in range(5)]
    reqs = [("owner", prefixes[0] + rand_tokens(40, 30), greedy(3), 0, 1)]  # aborted after its first chunk
    for i, p in enumerate(prefixes):
        for j in range(3):
            reqs.append((f"p{i}-{j}", p + rand_tokens(3 + j, 40 + 3 * i + j), greedy(5), 2 + i + 3 * j, None))
    a, b = drive(on, reqs), drive(off, reqs)
    same(a, b, [r[0] for r in reqs[1:]])
    st = on.prefix_cache_stats()
    assert st["snapshots"] <= 2 and on.kv.stats.snapshots > 2 and st["hits_total"] >= 1  # evictions happened
    held = sum(s.partial_block is not None for s in on.kv.prefix.entries.values())  # kept by the snapshots
    assert on.kv.pool.num_free == on.kv.pool.num_blocks - held and on.kv.reserved == 0  # every other block back


def test_mtp_with_the_prefix_cache_stays_lossless(tmp_path):
    path = add_mtp_weights(save_hf_model("qwen3_next", tmp_path / "m", seed=5, vocab_size=12))
    on, off = make(path, True, k=2), make(path, False, k=2)
    history = rand_tokens(40, 3, vocab=12)
    for turn in range(3):
        rid = f"t{turn}"
        a, b = drive(on, [(rid, history, greedy(8), 0, None)]), drive(off, [(rid, history, greedy(8), 0, None)])
        same(a, b, [rid])
        history = history + a[rid][0] + rand_tokens(5, turn, vocab=12)
    assert on.prefix_cache_stats()["hits_total"] == 2 and on.stats.draft_tokens > 0


def test_overlapped_decode_snapshots_the_state_its_last_step_fed(next_dir):
    """On the overlapped path a finished request's last output token was fed by the step launched after it:
    the snapshot holds it, and the next turn resumes one token further."""
    on = make(next_dir, True, overlap_decode=True)
    off = make(next_dir, False, overlap_decode=True)
    history = rand_tokens(30, 4)
    for turn in range(3):
        rid = f"t{turn}"
        a = drive(on, [(rid, history, greedy(7), 0, None)], keep_logits=False)
        b = drive(off, [(rid, history, greedy(7), 0, None)], keep_logits=False)
        assert a[rid][0] == b[rid][0]
        history = history + a[rid][0] + rand_tokens(4, 50 + turn)
    assert on.stats.overlapped_steps > 0 and on.prefix_cache_stats()["hits_total"] == 2


def test_kv_memory_is_the_blocks_in_use_not_slots_times_context(next_dir):
    eng = LLMEngine.from_pretrained(next_dir, dtype="float32", max_num_seqs=16, max_model_len=32768,
                                    num_kv_blocks=16 * 20)  # 16 x 320 positions, not 16 x 32k
    cfg = eng.cfg
    per_block = 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4 * len(cfg.attn_layers)
    assert eng.cache.size.kv_bytes == 16 * 20 * per_block
    for i in range(16):
        eng.add_request(str(i), rand_tokens(300, 60 + i), greedy(4))
    used = 0
    while eng.has_unfinished_requests():
        eng.step()
        used = max(used, eng.prefix_cache_stats()["kv_blocks_used"])
    assert used == 16 * 19  # ceil(303 / 16) blocks each at their longest
    with pytest.raises(ValueError, match="KV blocks"):
        eng.add_request("big", rand_tokens(6000, 1), greedy(10))  # more than the whole pool
