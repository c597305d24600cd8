"""deltaserve against llama.cpp on the same GGUF files, same threads, same run (issue 15).

The random 338M Qwen3-Next checkpoint of benchmarks/common.py, converted by llama.cpp's own converter
(../shared/tools/convert-to-gguf.py) to F32 and quantized by its llama-quantize to Q8_0 and Q4_K_M (Q5_K_M, Q3_K_M, Q2_K,
IQ4_XS, MXFP4_MOE on request). Per file and thread count, rounds alternate: deltaserve in a child process, then
`llama-batched-bench -npp 128 -ntg 32 -npl 1,8`. The same three numbers from both: prefill of a 128-token prompt
(t/s), decode of 32 tokens after it with 1 sequence and with 8 (aggregate t/s). Then the peak RSS of one
generation of 32 tokens after a 128-token prompt (`deltaserve generate` against llama-batched-bench -npl 1, both
with a 4096-token context).

Needs llama.cpp built by ../shared/tools/build-llama-cpp.sh (default ~/.cache/deltaserve-peer/llama.cpp).
Run: python benchmarks/bench_cpu.py [--rounds 3] [--threads 1,2] [--llama-cpp DIR]
[--files f32,q8_0,q4_k_m,q5_k_m,q3_k_m,q2_k,iq4_xs,mxfp4_moe]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from common import BENCH_CONFIG, bench_checkpoint, commit, machine, timed

REPO = Path(__file__).resolve().parent.parent
PROMPT, TOKENS, CTX = 128, 32, 4096
QUANTIZE = {"q8_0": "Q8_0", "q4_k_m": "Q4_K_M", "q3_k_m": "Q3_K_M", "q2_k": "Q2_K", "iq4_xs": "IQ4_XS",
            "q5_k_m": "Q5_K_M", "mxfp4_moe": "MXFP4_MOE"}


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, BENCH_CONFIG["vocab_size"], (n, PROMPT), generator=g).tolist()


def gguf_files(llama: Path, tools: Path, names: list[str]) -> dict[str, Path]:
    """The checkpoint as F32 / quantized GGUF files made by llama.cpp (built once, next to the checkpoint)."""
    ckpt = bench_checkpoint()
    out = {}
    f32 = ckpt.parent / "q338-f32.gguf"
    if not f32.is_file():
        for name in ("tokenizer.json", "tokenizer_config.json"):  # the embedded model's: llama.cpp wants one
            shutil.copy(REPO / "deltaserve/models/default" / name, ckpt / name)
        subprocess.run([sys.executable, str(tools / "convert-to-gguf.py"), str(llama), str(ckpt), "--outtype", "f32",
                        "--outfile", str(f32), "--no-mtp"], check=True, capture_output=True)
    for name in names:
        path = ckpt.parent / f"q338-{name}.gguf"
        if name != "f32" and not path.is_file():
            subprocess.run([str(llama / "build/bin/llama-quantize"), str(f32), str(path), QUANTIZE[name]], check=True,
                           capture_output=True)
        out[name] = path
    return out


def ours(path: Path) -> dict:
    """Prefill t/s of one 128-token prompt; decode t/s after it with 1 and with 8 sequences (LLMEngine)."""
    from deltaserve import LLMEngine, SamplingParams
    from deltaserve.forward_batch import Segment

    engine = LLMEngine.from_pretrained(path, dtype="float32", max_num_seqs=8, max_model_len=512)
    run = engine.runner.run
    run([Segment(prompts(1)[0], 0, 0)])  # warm-up
    out = {"pp": PROMPT / min(timed(lambda: run([Segment(prompts(1)[0], 0, 0)])) for _ in range(3))}
    for np_ in (1, 8):
        params = SamplingParams(max_tokens=TOKENS + 1, temperature=0, ignore_eos=True)
        for i, p in enumerate(prompts(np_)):
            engine.add_request(f"{np_}-{i}", p, params)
        while engine.scheduler.waiting or any(not s.output_ids for s in engine.scheduler.running):
            engine.step()  # prefill and first token
        out[f"tg{np_}"] = np_ * TOKENS / timed(lambda: [engine.step() for _ in range(TOKENS)])
        assert not engine.has_unfinished_requests()
    return out


def ours_child(path: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def batched_bench(llama: Path, path: Path, threads: int, npl: str = "1,8") -> list[list[str]]:
    cmd = [str(llama / "build/bin/llama-batched-bench"), "-m", str(path), "-c", str(CTX), "-b", "2048", "-ub", "512",
           "-npp", str(PROMPT), "-ntg", str(TOKENS), "-npl", npl, "-t", str(threads), "-tb", str(threads)]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if re.match(r"\|\s+\d+ \|", line)]


def peer(llama: Path, path: Path, threads: int) -> dict:
    """llama-batched-bench's PP t/s (B=1) and TG t/s for B=1 and B=8 (columns S_PP, S_TG)."""
    rows = {int(r[2]): r for r in batched_bench(llama, path, threads)}
    return {"pp": float(rows[1][5]), "tg1": float(rows[1][7]), "tg8": float(rows[8][7])}


def peak_rss(cmd: list[str]) -> float:
    """GB at the peak of `cmd`'s resident memory (GNU time's maximum resident set size)."""
    err = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=True).stderr
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) / 1e6


def rss_pair(llama: Path, path: Path, threads: int) -> tuple[float, float]:
    ids = ",".join(map(str, prompts(1)[0]))
    ours_cmd = [sys.executable, "-m", "deltaserve.cli.main", "generate", "-m", str(path), "--prompt-ids", ids,
                "-n", str(TOKENS), "--temp", "0", "-c", str(CTX), "-t", str(threads)]
    peer_cmd = [str(llama / "build/bin/llama-batched-bench"), "-m", str(path), "-c", str(CTX), "-npp", str(PROMPT),
                "-ntg", str(TOKENS), "-npl", "1", "-t", str(threads)]
    return peak_rss(ours_cmd), peak_rss(peer_cmd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--files", default="f32,q8_0,q4_k_m")
    ap.add_argument("--llama-cpp", type=Path, default=Path.home() / ".cache/deltaserve-peer/llama.cpp")
    ap.add_argument("--tools", type=Path, default=REPO.parent / "shared/tools", help="convert-to-gguf.py's folder")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # a GGUF file: run `ours` only, print JSON
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    if args.child:
        torch.set_num_threads(threads[0])
        print(json.dumps(ours(Path(args.child))))
        return
    if not (args.llama_cpp / "build/bin/llama-batched-bench").is_file():
        raise SystemExit(f"no llama.cpp build at {args.llama_cpp}: run ../shared/tools/build-llama-cpp.sh first")
    files = gguf_files(args.llama_cpp, args.tools, args.files.split(","))
    results = {(f, t, who): [] for f in files for t in threads for who in ("deltaserve", "llama.cpp")}
    for i in range(args.rounds):  # alternate, so both see the same machine noise; alternate who goes first
        for f, path in files.items():
            for t in threads:
                for who in (("deltaserve", "llama.cpp") if i % 2 == 0 else ("llama.cpp", "deltaserve")):
                    run = ours_child(path, t) if who == "deltaserve" else peer(args.llama_cpp, path, t)
                    results[f, t, who].append(run)
    rss = {f: rss_pair(args.llama_cpp, path, max(threads)) for f, path in files.items()}
    print(f"# {machine().split(',')[0]}, torch {torch.__version__} | commit {commit()} | {datetime.date.today()} | "
          f"random Qwen3-Next 338M ({BENCH_CONFIG['num_hidden_layers']} layers), files by llama.cpp's converter + "
          f"llama-quantize | prompt {PROMPT}, {TOKENS} new tokens, median of {args.rounds} alternated rounds")
    print("\n| file | threads | pp128 t/s ds / llama.cpp | TG np=1 t/s ds / llama.cpp | TG np=8 t/s ds / llama.cpp |")
    print("|---|---|---|---|---|")
    for f in files:
        for t in threads:
            med = {who: {m: statistics.median(r[m] for r in results[f, t, who]) for m in ("pp", "tg1", "tg8")}
                   for who in ("deltaserve", "llama.cpp")}
            cells = [f"{med['deltaserve'][m]:.1f} / {med['llama.cpp'][m]:.1f} = "
                     f"**{med['deltaserve'][m] / med['llama.cpp'][m]:.2f}x**" for m in ("pp", "tg1", "tg8")]
            print(f"| {f.upper()} | {t} | " + " | ".join(cells) + " |")
    print("\n| file | file size | peak RSS deltaserve generate | peak RSS llama.cpp | ratio |\n|---|---|---|---|---|")
    for f, path in files.items():
        ours_gb, peer_gb = rss[f]
        print(f"| {f.upper()} | {path.stat().st_size / 2**20:.0f} MiB | {ours_gb:.2f} GB | {peer_gb:.2f} GB | "
              f"{ours_gb / peer_gb:.2f}x |")


if __name__ == "__main__":
    main()
