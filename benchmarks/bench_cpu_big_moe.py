"""A Qwen3.5-35B-A3B-sized MoE on the CPU from quantized files: resident memory and decode against llama.cpp
(issue 15).

Qwen3.5-35B-A3B's real layer dimensions (hidden 2048, 256 experts of width 512, top-8 plus a shared expert, GDN
16 QK / 32 V heads of 128, attention 16 Q / 2 KV heads of 256, vocabulary 248320) with 8 of its 40 layers,
random bf16 weights written shard by shard (never a whole model in memory), converted by llama.cpp's converter
and quantized by its llama-quantize (Q4_K_M, or --type). Then: the bytes deltaserve keeps resident against the file's
tensor bytes, and decode of one sequence (128-token prompt, 32 tokens) against llama-batched-bench, alternated.

Run: python benchmarks/bench_cpu_big_moe.py [--layers 8] [--type Q4_K_M,Q2_K] [--rounds 3] [--threads 2]
[--llama-cpp DIR]
(~25 GB of disk for the bf16 files on the way, ~5 GB kept; about 30 min the first time, on 2 cores.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench_cpu import REPO, batched_bench, peak_rss
from common import commit, machine, timed

DIMS = dict(vocab_size=248320, hidden_size=2048, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
            linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
            linear_conv_kernel_dim=4, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
            shared_expert_intermediate_size=512, max_position_embeddings=8192, tie_word_embeddings=False,
            rms_norm_eps=1e-6)  # layer types: transformers' default, every 4th attention
ROOT = Path("/tmp/deltaserve-bench")


def write_checkpoint(path: Path, layers: int) -> None:
    """Random bf16 Qwen3_5MoeForCausalLM weights, one safetensors shard per layer (names and shapes from
    transformers' model built on the meta device)."""
    from safetensors.torch import save_file
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    cfg = Qwen3_5MoeTextConfig(num_hidden_layers=layers, architectures=["Qwen3_5MoeForCausalLM"], **DIMS)
    with torch.device("meta"):
        model = Qwen3_5MoeForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    shards: dict[str, dict[str, tuple]] = {}
    for name, p in model.named_parameters():
        part = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(part, {})[name] = tuple(p.shape)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for part, params in shards.items():
        tensors = {}
        for name, shape in params.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.zeros(shape, dtype=torch.bfloat16)
            elif name.endswith("A_log"):
                tensors[name] = torch.rand(shape, generator=g).mul(2).to(torch.bfloat16)
            else:
                tensors[name] = torch.randn(shape, generator=g).mul(0.02).to(torch.bfloat16)
        fname = f"model-{part}.safetensors"
        save_file(tensors, path / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # llama.cpp's converter wants a tokenizer
        shutil.copy(REPO / "deltaserve/models/default" / name, path / name)


def quantized_files(llama: Path, tools: Path, layers: int, ftypes: list[str]) -> dict[str, Path]:
    """{ftype: the model quantized by llama-quantize to it}, all from one bf16 conversion (made once, then deleted)."""
    out = {t: ROOT / f"qwen35moe-35b-dims-{layers}l-{t.lower()}.gguf" for t in ftypes}
    missing = [t for t, path in out.items() if not path.is_file()]
    if not missing:
        return out
    ckpt, bf16 = ROOT / f"qwen35moe-35b-dims-{layers}l", ROOT / f"qwen35moe-35b-dims-{layers}l-bf16.gguf"
    if not (ckpt / "model.safetensors.index.json").is_file():
        write_checkpoint(ckpt, layers)
    subprocess.run([sys.executable, str(tools / "convert-to-gguf.py"), str(llama), str(ckpt), "--outtype", "bf16",
                    "--outfile", str(bf16), "--no-mtp"], check=True, capture_output=True)
    for t in missing:
        subprocess.run([str(llama / "build/bin/llama-quantize"), str(bf16), str(out[t]), t], check=True,
                       capture_output=True)
    bf16.unlink()
    shutil.rmtree(ckpt)
    return out


def ours(path: Path) -> dict:
    """Resident weight bytes after load and packing, the file's tensor bytes, and decode t/s of one sequence."""
    from deltaserve import LLMEngine, SamplingParams
    from deltaserve.weights.gguf_file import GGUFFile

    f = GGUFFile(path)
    file_bytes = sum(f.data_bytes(n) for n in f.tensors)
    engine = LLMEngine.from_pretrained(path, dtype="float32", max_num_seqs=1, max_model_len=512)
    prompt = torch.randint(0, 4096, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    engine.add_request("a", prompt, SamplingParams(max_tokens=33, temperature=0, ignore_eos=True))
    engine.step()  # prefill and first token
    tg = 32 / timed(lambda: [engine.step() for _ in range(32)])
    return {"tg1": tg, "resident": engine.runner.model.weight_bytes(), "file": file_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--type", default="Q4_K_M", help="llama-quantize's file types, comma-separated (Q4_K_M,Q2_K)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-cpp", type=Path, default=Path.home() / ".cache/deltaserve-peer/llama.cpp")
    ap.add_argument("--tools", type=Path, default=REPO.parent / "shared/tools")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(ours(Path(args.child))))
        return
    types = args.type.split(",")
    files = quantized_files(args.llama_cpp, args.tools, args.layers, types)
    print(f"# {machine().split(',')[0]}, {args.threads} threads, torch {torch.__version__} | commit {commit()} | "
          f"Qwen3.5-35B-A3B dims, {args.layers} layers, random weights, files by llama-quantize | median of "
          f"{args.rounds} alternated rounds")
    rows = []
    for t, path in files.items():
        cmd = [sys.executable, __file__, "--child", str(path), "--threads", str(args.threads)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        runs, peer = [], []
        for i in range(args.rounds):
            for who in (("ds", "llama") if i % 2 == 0 else ("llama", "ds")):
                if who == "ds":
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                    runs.append(json.loads(out.stdout.splitlines()[-1]))
                else:
                    peer.append(float(batched_bench(args.llama_cpp, path, args.threads, npl="1")[0][7]))
        ds, lc, r = statistics.median(x["tg1"] for x in runs), statistics.median(peer), runs[0]
        held = f"{r['resident'] / 2**30:.2f} GiB = {r['resident'] / r['file']:.3f}x"
        rows.append(f"| {t} | {r['file'] / 2**30:.2f} GiB | {held} | {peak_rss(cmd):.2f} GB | {ds:.2f} | {lc:.2f} | "
                    f"**{ds / lc:.2f}x** |")
    print("\n| file | tensor bytes | deltaserve resident weights | peak RSS (measuring process) | decode np=1 t/s "
          "deltaserve | llama.cpp | ratio |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
