"""CUDA decode and prefill speed (issue 7): deltaserve against its HBM roofline and HF transformers.

Configs with real layer dimensions and RANDOM bf16 weights (HF's initialisation, seed 0):
- qwen3.5-0.8b: a Qwen3.5-0.8B-class text model: 24 layers (18 GDN + 6 attention), hidden 1024, GDN 16 QK / 16 V
  heads of 128, attention 8 Q / 2 KV heads of 256, MLP 3584, vocab 248320, tied embeddings (small matrices: the
  per-kernel cost shows).
- qwen3.5-2b: Qwen3.5-2B's text model, all 24 layers (18 GDN + 6 attention), hidden 2048, GDN 16 QK / 16 V
  heads of 128, attention 8 Q / 2 KV heads of 256, MLP 6144, vocab 248320, tied embeddings.
- qwen3-next-8l: Qwen3-Next-80B-A3B's layer dimensions, 8 of its 48 layers (6 GDN + 2 attention) so that the
  model fits one GPU: hidden 2048, GDN 16 QK / 32 V heads, attention 16 Q / 2 KV heads of 256, 512 experts
  top-10 of width 512 + a shared expert of 512, vocab 151936.
deltaserve's model is built from the HF model's tensors (shared storage where layouts agree).

Per config: time to first token of a 128-token prompt and of 64 such prompts at once (prefill graphs on), decode
step time at np = 1, 8, 64, 256 (LLMEngine.step of greedy requests, CUDA graphs; context
128-140 tokens), with overlap_decode (the default: step N+1 launched before step N's tokens are read) and
without it (each step waits for its tokens before the next is built), and a bare replay of that step's graph,
prefill tokens/s (4 x 1024 tokens in one step), the HBM roofline of each decode step and the ratio to it,
and HF transformers (its default attention and experts code, fla kernels for the delta rule) timed the same way.
Roofline bytes: every weight once (routed experts: the expected number hit under uniform routing,
E(1-(1-k/E)^np); embedding: np rows, or the whole table once when tied as the LM head), each sequence's
delta-rule state and conv window read and written, its KV read plus one row written, fp32 logits written;
divided by the device-to-device copy bandwidth measured here (bytes read + written).

Run: python benchmarks/bench_cuda.py [--configs qwen3.5-2b qwen3-next-8l] [--nps 1 8 64 256] [--no-hf]
     [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import time

import torch

from common import batch_time, commit, prompts, ttft
from deltaserve import LLMEngine, SamplingParams
from deltaserve.config import ModelConfig
from deltaserve.forward_batch import Segment
from deltaserve.layers.model import HybridModel
from deltaserve.weights.hf_layout import hf_recipes

CONFIGS = {
    "qwen3.5-0.8b": ("qwen3_5", dict(
        vocab_size=248320, hidden_size=1024, num_hidden_layers=24, intermediate_size=3584, num_attention_heads=8,
        num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
        linear_key_head_dim=128, linear_value_head_dim=128, tie_word_embeddings=True)),
    "qwen3.5-2b": ("qwen3_5", dict(
        vocab_size=248320, hidden_size=2048, num_hidden_layers=24, intermediate_size=6144, num_attention_heads=8,
        num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16,
        linear_key_head_dim=128, linear_value_head_dim=128, tie_word_embeddings=True)),
    "qwen3-next-8l": ("qwen3_next", dict(
        vocab_size=151936, hidden_size=2048, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128, num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, intermediate_size=5120, tie_word_embeddings=False)),
}
NPS, PROMPT, STEPS, WARM = (1, 8, 64, 256), 128, 10, 2
SAMPLED = dict(temperature=0.8, top_k=50)  # the sampled decode rows (greedy: temperature 0)
PREFILL = (4, 1024)


def sync_time(fn, reps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def copy_bandwidth() -> float:
    x = torch.randn(1 << 28, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * x.numel() * 4 / statistics.median(times[5:])


def build(arch: str, overrides: dict):
    import transformers as tf
    cfg_cls, model_cls = {"qwen3_next": (tf.Qwen3NextConfig, tf.Qwen3NextForCausalLM),
                          "qwen3_5": (tf.Qwen3_5TextConfig, tf.Qwen3_5ForCausalLM)}[arch]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        hf = model_cls(cfg_cls(**overrides)).eval()
    torch.set_default_dtype(torch.float32)
    cfg = ModelConfig.from_dict(hf.config.to_dict())
    sd = hf.state_dict()
    with torch.device("meta"):
        ours = HybridModel(cfg)
    ours.load_state_dict({p: r.combine([sd[n] for n, _ in r.sources]).to(torch.bfloat16).contiguous()
                          for p, r in hf_recipes(cfg, set(sd), 0).items()}, strict=True, assign=True)
    return hf, ours.eval(), cfg


def decode_bytes(model: HybridModel, cfg: ModelConfig, np_: int, ctx: int) -> float:
    total = 0.0
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        if "experts_" in name:  # routed experts: only those hit this step
            n *= 1 - (1 - cfg.top_k / cfg.num_experts) ** np_
        elif name == "embed.weight" and model.lm_head is not None:
            n = np_ * p.shape[1] * p.element_size()
        total += n
    gdn, attn = len(cfg.gdn_layers), len(cfg.attn_layers)
    state = cfg.num_v_heads * cfg.k_head_dim * cfg.v_head_dim * 4 + (cfg.conv_kernel - 1) * cfg.conv_dim * 2
    kv_row = 2 * cfg.num_kv_heads * cfg.head_dim * 2
    return total + np_ * (gdn * 2 * state + attn * (ctx + 1) * kv_row + cfg.vocab_size * 4)


def ours_decode(engine: LLMEngine, vocab: int, np_: int, overlap: bool, sampled: bool = False) -> tuple[float, int]:
    """(time of one LLMEngine.step of np_ decodes, context reached); greedy, or SAMPLED's parameters."""
    engine.overlap_decode = overlap
    prompts = torch.randint(vocab, (np_, PROMPT), generator=torch.Generator().manual_seed(np_)).tolist()
    kind = SAMPLED if sampled else {"temperature": 0}
    for i, p in enumerate(prompts):  # none ends while timed
        params = SamplingParams(max_tokens=WARM + STEPS + 2, ignore_eos=True, seed=i, **kind)
        engine.add_request(f"{np_}-{overlap}-{sampled}-{i}", p, params)
    while len(engine.step()) < np_:  # the prefill step (budget: every prompt at once) and its first tokens
        pass
    for _ in range(WARM):
        engine.step()
    t = sync_time(engine.step, STEPS)
    while engine.has_unfinished_requests():
        engine.step()
    return t, PROMPT + WARM + STEPS + 1


def replay_time(engine: LLMEngine, np_: int) -> float | None:
    """A bare replay of the np_-row decode graph (on the last step's inputs, now free slots)."""
    graphs = engine.runner.graphs
    return None if graphs is None else sync_time(graphs.graphs[graphs.size_of[np_]][0].replay, STEPS)


def hf_decode(hf, vocab: int, np_: int) -> float:
    ids = torch.randint(vocab, (np_, PROMPT), generator=torch.Generator().manual_seed(np_)).cuda()
    out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def step():
        nonlocal nxt
        nxt = hf(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    for _ in range(WARM):
        step()
    return sync_time(step, STEPS)


def prefill(fn) -> float:
    fn()  # warm-up: compiles and autotunes
    return sync_time(fn, 2)


@torch.inference_mode()
def run_config(name: str, bandwidth: float, hf_too: bool, nps: list[int]) -> dict:
    arch, overrides = CONFIGS[name]
    hf, ours, cfg = build(arch, overrides)
    engine = LLMEngine(ours, cfg, max_num_seqs=max(nps), max_model_len=PREFILL[1] + 64,
                       max_num_batched_tokens=max(nps) * PROMPT, device="cuda")
    runner = engine.runner
    res = {"config": name, "params": sum(p.numel() for p in hf.parameters()), "decode": []}
    probe = torch.randint(cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    mine = runner.run([Segment(probe, 0, 0, 64)])[0]
    theirs = hf(input_ids=torch.tensor([probe], device="cuda")).logits[0].float()
    res["parity_top1"] = float((mine.argmax(-1) == theirs.argmax(-1)).float().mean())
    res["parity_max_abs"] = float((mine - theirs).abs().max())
    for np_ in nps:
        sync, _ = ours_decode(engine, cfg.vocab_size, np_, overlap=False)
        t, ctx = ours_decode(engine, cfg.vocab_size, np_, overlap=True)
        sampled_sync, _ = ours_decode(engine, cfg.vocab_size, np_, overlap=False, sampled=True)
        sampled, _ = ours_decode(engine, cfg.vocab_size, np_, overlap=True, sampled=True)
        roof = decode_bytes(ours, cfg, np_, ctx) / bandwidth
        row = {"np": np_, "ours_ms": t * 1e3, "sync_ms": sync * 1e3, "replay_ms": replay_time(engine, np_) * 1e3,
               "roof_ms": roof * 1e3, "ratio": t / roof, "sampled_ms": sampled * 1e3,
               "sampled_sync_ms": sampled_sync * 1e3}
        if hf_too:
            row["hf_ms"] = hf_decode(hf, cfg.vocab_size, np_) * 1e3
        res["decode"].append(row)
        print(name, row, flush=True)
    graphs, runner.graphs = runner.graphs, None
    res["eager_np1_ms"] = ours_decode(engine, cfg.vocab_size, 1, overlap=True)[0] * 1e3
    runner.graphs = graphs
    n, length = PREFILL
    prompts = torch.randint(cfg.vocab_size, (n, length), generator=torch.Generator().manual_seed(2))
    segs = [Segment(p, 0, s) for s, p in enumerate(prompts.tolist())]
    res["ours_prefill_tps"] = n * length / prefill(lambda: runner.run(segs))
    if hf_too:
        ids = prompts.cuda()
        res["hf_prefill_tps"] = n * length / prefill(lambda: hf(input_ids=ids, use_cache=True, logits_to_keep=1))
        res["hf_experts"] = getattr(hf.config, "_experts_implementation", None)
    res.update(first_tokens(ours, cfg, hf if hf_too else None))
    print(name, {k: v for k, v in res.items() if k != "decode"}, flush=True)
    return res


def first_tokens(model: HybridModel, cfg: ModelConfig, hf) -> dict:
    """Time to first token of one 128-token prompt and of 64 at once (add_request to every first token; best of a
    few), on an engine of the defaults (token budget) with prefill graphs on, warmed until its graphs are
    captured; HF (when given): one forward of the same shape and the argmax read back."""
    engine = LLMEngine(model, cfg, max_num_seqs=64, max_model_len=PROMPT + 64, device="cuda", prefill_graphs=True)
    v = cfg.vocab_size
    for i in range(3):  # compile, autotune, capture
        ttft(engine, prompts(1, PROMPT, v, 100 + i)[0], f"warm{i}")
        batch_time(engine, prompts(64, PROMPT, v, 200 + i), f"warmb{i}")
    res = {"ttft_ms": min(ttft(engine, prompts(1, PROMPT, v, i)[0], f"t{i}") for i in range(5)) * 1e3,
           "batch64_ms": min(batch_time(engine, prompts(64, PROMPT, v, 20 + i), f"b{i}") for i in range(3)) * 1e3}
    for key, n in (("hf_ttft_ms", 1), ("hf_batch64_ms", 64)) if hf is not None else ():
        ids = torch.tensor(prompts(n, PROMPT, v, 5), device="cuda")

        def first(ids=ids):
            return hf(input_ids=ids, use_cache=True, logits_to_keep=1).logits.argmax(-1).tolist()
        first()
        res[key] = sync_time(first, 3) * 1e3
    return res


def ratio(r: dict, key: str) -> tuple[str, str]:
    """(HF's time, HF's / ours) for a result key, dashes without HF."""
    theirs = r.get("hf_" + key)
    return ("-", "-") if theirs is None else (f"{theirs:.2f}", f"{theirs / r[key]:.2f}x")


def table(results: list[dict], bandwidth: float) -> str:
    lines = [f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write), "
             f"torch {torch.__version__}, commit {commit()}, {datetime.date.today()}; random bf16 weights", "",
             "| config | np | deltaserve ms/step | without overlap | graph replay ms | tok/s | roofline ms | "
             "x roofline | HF ms/step | HF / deltaserve |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for d in r["decode"]:
            hf, speedup = ("-", "-") if "hf_ms" not in d else (f"{d['hf_ms']:.1f}", f"{d['hf_ms'] / d['ours_ms']:.1f}")
            lines.append(f"| {r['config']} | {d['np']} | {d['ours_ms']:.3f} | {d['sync_ms']:.3f} | "
                         f"{d['replay_ms']:.3f} | {d['np'] / d['ours_ms'] * 1e3:.0f} | "
                         f"{d['roof_ms']:.2f} | {d['ratio']:.2f} | {hf} | {speedup} |")
    lines += ["", f"Sampled decode ({', '.join(f'{k} {v}' for k, v in SAMPLED.items())}, seeded):", "",
              "| config | np | ms/step (overlap) | without overlap | greedy ms/step (overlap) |",
              "|---|---|---|---|---|"]
    for r in results:
        for d in r["decode"]:
            lines.append(f"| {r['config']} | {d['np']} | {d['sampled_ms']:.3f} | {d['sampled_sync_ms']:.3f} | "
                         f"{d['ours_ms']:.3f} |")
    lines += ["", f"Time to first token (prefill graphs on; {PROMPT}-token prompts):", "",
              "| config | 1 prompt ms | HF ms | HF / deltaserve | 64 prompts ms | HF ms | HF / deltaserve |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [f"{r['ttft_ms']:.2f}", *ratio(r, "ttft_ms"), f"{r['batch64_ms']:.2f}", *ratio(r, "batch64_ms")]
        lines.append(f"| {r['config']} | {' | '.join(cells)} |")
    lines += ["", "| config | prefill t/s deltaserve | prefill t/s HF | eager np=1 ms (no graphs) | "
              "top-1 agreement with HF (64 tokens) |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['config']} | {r['ours_prefill_tps']:.0f} | {r.get('hf_prefill_tps', 0):.0f} | "
                     f"{r['eager_np1_ms']:.2f} | {r['parity_top1']:.2f} (max abs diff {r['parity_max_abs']:.2f}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--nps", type=int, nargs="+", default=list(NPS), help="decode batch sizes")
    ap.add_argument("--out", help="write the raw results as JSON here")
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    results = []
    for name in args.configs:
        results.append(run_config(name, bandwidth, not args.no_hf, args.nps))
        gc.collect()  # the config's models and cache
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bandwidth": bandwidth, "results": results}, f, indent=1)
    print(table(results, bandwidth))


if __name__ == "__main__":
    main()
