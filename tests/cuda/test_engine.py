"""The engine on CUDA: concurrency guarantees up to np = 64, and CUDA graphs that take slots as data.

Tiny random float32 checkpoints (tests/tiny_models.py, peaky router and LM head): a token
mismatch means a bug, not a near-tie.
"""

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from deltaserve import LLMEngine, SamplingParams  # noqa: E402
from deltaserve.forward_batch import Segment  # noqa: E402
from drive import drive  # noqa: E402


def engine(path, np_: int, budget: int = 64) -> LLMEngine:
    return LLMEngine.from_pretrained(path, device="cuda", dtype="float32", max_num_seqs=np_, max_model_len=256,
                                     max_num_batched_tokens=budget, prefill_graphs=True)


@pytest.mark.parametrize("np_", [1, 8, 64])
@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5", "qwen3_5_moe"])
def test_each_sequence_matches_its_solo_run(tiny_dirs, arch, np_, note):
    eng = engine(tiny_dirs[arch], np_)
    rng = random.Random(np_)
    vocab = eng.cfg.vocab_size
    requests = []
    for i in range(max(2, 2 * np_)):  # more requests than slots: slots are reused after finish and abort
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        params = SamplingParams(max_tokens=rng.randint(4, 14), temperature=0) if i % 3 else \
            SamplingParams(max_tokens=rng.randint(4, 14), temperature=0.9, top_p=0.9, seed=i)
        requests.append((f"r{i}", prompt, params, rng.randint(0, 8), rng.randint(2, 6) if i % 5 == 4 else None))
    together = drive(eng, requests)
    diffs = []
    assert eng.stats.max_batch_seqs >= min(np_, 2)
    for rid, prompt, params, _, abort in requests:
        ref_tokens, ref_logits = drive(eng, [(rid + "-solo", prompt, params, 0, None)])[rid + "-solo"][:2]
        tokens, logits, _ = together[rid]
        if abort is None:
            assert tokens == ref_tokens, rid
            diffs.append(float((logits - ref_logits).abs().max()))
            torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-3)
        else:
            assert tokens == ref_tokens[: len(tokens)], rid
    assert eng.scheduler.slots.available == eng.cache.max_num_seqs
    note(f"engine {arch} np={np_}: max |logit difference| batched vs solo {max(diffs, default=0):.2e}")


@pytest.mark.parametrize("np_", [1, 8, 64])
@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5", "qwen3_5_moe"])
def test_overlapped_decode_matches_solo(tiny_dirs, arch, np_):
    """Requests that keep no logits take the overlapped path: step N+1 is launched from step N's tokens (in-graph
    argmax, or drawn on the device with the uniform the sequence's generator gave at launch; top-p alone syncs
    inside the draw) before the host reads them. Each sequence's tokens equal its solo run on the step-by-step
    engine; sequences finish (length, abort) while the others' next step is in flight, and slots are reused."""
    eng, ref = engine(tiny_dirs[arch], np_), engine(tiny_dirs[arch], np_)
    ref.overlap_decode = False
    rng = random.Random(100 + np_)
    vocab = eng.cfg.vocab_size
    sampling = [dict(temperature=0), dict(temperature=0), dict(temperature=0.8), dict(temperature=1.1, top_k=5),
                dict(temperature=0.9, top_p=0.8)]
    requests = [(f"r{i}", [rng.randrange(vocab) for _ in range(rng.randint(1, 40))],
                 SamplingParams(max_tokens=rng.randint(4, 20), seed=i, **sampling[i % 5]), rng.randint(0, 8),
                 rng.randint(3, 8) if i % 7 == 6 else None) for i in range(max(2, 2 * np_))]
    together = drive(eng, requests, keep_logits=False)
    assert eng.stats.overlapped_steps >= 5 and eng.in_flight is None
    for rid, prompt, params, _, abort in requests:
        solo = drive(ref, [(rid, prompt, params, 0, None)], keep_logits=False)[rid][0]
        tokens = together[rid][0]
        assert tokens == (solo if abort is None else solo[: len(tokens)]), rid
    assert eng.scheduler.slots.available == eng.cache.max_num_seqs


def pools(eng: LLMEngine) -> list[torch.Tensor]:
    return [t.clone() for i in range(eng.cfg.num_layers) for t in eng.cache.layer(i)]


def others_rows(eng: LLMEngine, slots) -> list[torch.Tensor]:
    """Per tensor of pools(): the rows that belong to slots outside `slots`: state rows by slot, KV rows by block
    (the block table's rows of those slots)."""
    others = torch.tensor([s for s in range(eng.cache.max_num_seqs) if s not in slots])
    blocks = eng.cache.block_table[others.to(eng.cache.block_table.device)].flatten().long().unique()
    return [blocks if i in eng.cfg.attn_layers else others for i in range(eng.cfg.num_layers) for _ in range(2)]


def restore(eng: LLMEngine, saved: list[torch.Tensor]) -> None:
    for t, s in zip((t for i in range(eng.cfg.num_layers) for t in eng.cache.layer(i)), saved):
        t.copy_(s)


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5_moe"])
def test_one_graph_serves_any_slot_assignment(tiny_dirs, arch):
    """One captured graph (batch 8) replayed with 5 rows on different slots each time (3 padding rows):
    logits and every slot's state equal an eager run, and slots outside the step are untouched."""
    eng = engine(tiny_dirs[arch], 16)
    runner, rng = eng.runner, random.Random(0)
    live = [3, 7, 1, 12, 5, 9, 14, 0]
    prompts = {s: [rng.randrange(eng.cfg.vocab_size) for _ in range(rng.randint(1, 30))] for s in live}
    runner.run([Segment(p, 0, s, 1) for s, p in prompts.items()])  # prefill (eager)
    pos = {s: len(p) for s, p in prompts.items()}
    graph = None
    for step, slots in enumerate([[3, 7, 1, 12, 5], [12, 0, 9, 3, 14], [14, 9, 5, 0, 1], [0, 1, 3, 5, 7]]):
        segs = [Segment([rng.randrange(eng.cfg.vocab_size)], pos[s], s) for s in slots]
        before = pools(eng)
        got = runner.graphs.run(segs)
        graph = graph or runner.graphs.graphs[8][0]
        assert runner.graphs.graphs[8][0] is graph and len(got) == 5
        after_graph = pools(eng)
        restore(eng, before)
        graphs, runner.graphs = runner.graphs, None  # the eager path
        want = runner.run(segs)
        runner.graphs = graphs
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
        for t_graph, t_eager, t_before, rows in zip(after_graph, pools(eng), before, others_rows(eng, slots)):
            torch.testing.assert_close(t_graph, t_eager, rtol=1e-5, atol=1e-5)
            assert torch.equal(t_graph[rows], t_before[rows])  # state, conv and KV of other slots
        for s in slots:
            pos[s] += 1


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5_moe"])
def test_one_prefill_graph_serves_any_slots_and_splits(tiny_dirs, arch):
    """Steps of prompt chunks beside decodes, of one graph shape (4 decode rows, 128 prefill tokens with the padding
    segment, 8 segments, 4 chunks) with other slots, lengths and start positions each time, new prompts and
    continued ones, 3 or 4 decodes (a padding decode row or none): captured on the shape's second sight, then
    replayed; logits and every slot's state equal an eager run, other slots are untouched."""
    eng = engine(tiny_dirs[arch], 16, budget=256)
    runner, rng = eng.runner, random.Random(2)
    graphs, runner.prefill_graphs = runner.prefill_graphs, None
    pos = {s: 70 for s in (3, 7, 1, 12, 5, 9, 4, 8)}
    runner.run([Segment([rng.randrange(eng.cfg.vocab_size) for _ in range(70)], 0, s, 0) for s in pos])  # eager
    steps = [[(3, 40), (4, 1), (0, 30), (12, 50), (8, 1), (5, 1)],
             [(14, 10), (9, 1), (7, 60), (4, 1), (1, 45), (8, 1), (5, 1)],
             [(5, 64), (3, 20), (4, 1), (0, 30), (8, 1), (9, 1)],
             [(7, 1), (9, 33), (2, 63), (8, 1), (12, 2), (4, 1)]]
    for step in steps:  # (slot, tokens): 3 or 4 decodes, 97 to 120 prefill tokens in 3 segments of one chunk each
        segs = [Segment([rng.randrange(eng.cfg.vocab_size) for _ in range(n)], pos.get(s, 0), s,
                        1 if n == 1 else rng.randint(0, 1)) for s, n in step]
        before = pools(eng)
        runner.prefill_graphs = graphs
        got = runner.run(segs)
        after_graph = pools(eng)
        restore(eng, before)
        runner.prefill_graphs = None
        want = runner.run(segs)
        for g, w, seg in zip(got, want, segs):
            assert g.shape == (seg.num_logits, eng.cfg.vocab_size)
            torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
        for t_graph, t_eager, t_before, rows in zip(after_graph, pools(eng), before, others_rows(eng, dict(step))):
            torch.testing.assert_close(t_graph, t_eager, rtol=1e-4, atol=1e-4)
            assert torch.equal(t_graph[rows], t_before[rows])  # state, conv and KV of other slots
        for s, n in step:
            pos[s] = pos.get(s, 0) + n
    assert list(graphs.graphs) == [(4, 128, 8, 4)]


@pytest.mark.parametrize("arch", ["qwen3_next", "qwen3_5"])
def test_bf16_decode_graph_with_dependent_launches_matches_eager(tiny_dirs, arch, note):
    """bf16, one sequence: the decode graph (one-row GEMVs launched as programmatic dependent launches, the
    norm/gate in the out-projection's prologue) against the eager path with dependent launches off, step
    by step from the same state: same kernels, so a GEMV that read its input before the previous kernel
    finished would show as a difference far above bf16 rounding."""
    from deltaserve.kernels.triton import linear
    eng = LLMEngine.from_pretrained(tiny_dirs[arch], device="cuda", dtype="bfloat16", max_num_seqs=4,
                                    max_model_len=256)
    runner, rng = eng.runner, random.Random(1)
    prompt = [rng.randrange(eng.cfg.vocab_size) for _ in range(20)]
    tok = int(runner.run([Segment(prompt, 0, 2, 1)])[0].argmax())
    diffs = []
    try:
        for pos in range(len(prompt), len(prompt) + 6):
            before = pools(eng)
            linear.PDL_ON = True
            got = runner.graphs.run([Segment([tok], pos, 2)])[0]
            after_graph = pools(eng)
            restore(eng, before)
            linear.PDL_ON = False
            graphs, runner.graphs = runner.graphs, None
            want = runner.run([Segment([tok], pos, 2)])[0]
            runner.graphs = graphs
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
            for t_graph, t_eager in zip(after_graph, pools(eng)):
                torch.testing.assert_close(t_graph.float(), t_eager.float(), rtol=2e-2, atol=2e-2)
            diffs.append(float((got - want).abs().max()))
            tok = int(want.argmax())
    finally:
        linear.PDL_ON = True
    note(f"bf16 graph (dependent launches) vs eager (none) {arch}: max |logit difference| {max(diffs):.2e}")
