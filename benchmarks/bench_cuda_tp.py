"""Tensor parallelism on CUDA (issue 19): decode step time of bench_cuda's Qwen3-Next-dims config (qwen3-next-8l:
Qwen3-Next-80B-A3B's layer dimensions, 8 of 48 layers, RANDOM bf16 weights) at TP = 1, 2, 4 (as many as the machine
has GPUs), np = 1 and 64, against the TP=1 run and against the single-card roofline divided by the TP size (the
bytes of a step are split over the cards; the all-reduces add latency, not bytes). The model is written once as a
safetensors checkpoint, from which every rank reads its shard (NCCL, rank r on GPU r). Overlapped decoding is off
under TP (steps cross processes), so TP=1 is timed both ways.

Run: python benchmarks/bench_cuda_tp.py [--config qwen3-next-8l] [--tps 1 2 4] [--nps 1 64] [--dir /tmp/tp-ckpt]
"""

from __future__ import annotations

import argparse
import datetime
import gc

import torch

from bench_cuda import CONFIGS, build, copy_bandwidth, decode_bytes, ours_decode
from common import commit
from deltaserve import LLMEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="qwen3-next-8l", choices=list(CONFIGS))
    ap.add_argument("--tps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--nps", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--dir", default="/tmp/tp-ckpt", help="where the random checkpoint is written")
    args = ap.parse_args()
    tps = [tp for tp in args.tps if tp <= torch.cuda.device_count()]
    bandwidth = copy_bandwidth()
    hf, ours, cfg = build(*CONFIGS[args.config])
    # the roofline's bytes at the context ours_decode reaches (prompt 128 + warm-up + timed steps)
    step_bytes = {np_: decode_bytes(ours, cfg, np_, 141) for np_ in args.nps}
    hf.save_pretrained(args.dir)
    del hf, ours
    gc.collect()
    torch.cuda.empty_cache()
    print(f"# {torch.cuda.get_device_name()} x{torch.cuda.device_count()} | torch {torch.__version__} | commit "
          f"{commit()} | {datetime.date.today()} | {args.config}, random bf16 weights | copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s per card", flush=True)
    rows = ["| TP | np | overlap | ms/step | tok/s | TP=1 / this | roofline / TP (ms) | x (roofline / TP) |",
            "|---|---|---|---|---|---|---|---|"]
    base = {}
    for tp in tps:
        engine = LLMEngine.from_pretrained(args.dir, device="cuda", dtype="bfloat16", tensor_parallel_size=tp,
                                           max_num_seqs=max(args.nps), max_model_len=256)
        for np_ in args.nps:
            for overlap in ([True, False] if tp == 1 else [False]):
                t, _ = ours_decode(engine, cfg.vocab_size, np_, overlap)
                base.setdefault(np_, t)
                roof = step_bytes[np_] / bandwidth / tp
                rows.append(f"| {tp} | {np_} | {'on' if overlap else 'off'} | {t * 1e3:.3f} | {np_ / t:.0f} | "
                            f"{base[np_] / t:.2f} | {roof * 1e3:.3f} | {t / roof:.2f} |")
                print(rows[-1], flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
