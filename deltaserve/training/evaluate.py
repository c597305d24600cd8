"""Held-out evaluation of a checkpoint through the engine: python -m deltaserve.training.evaluate --model DIR.

Perplexity: each held-out file (data.source_files) is tokenised alone and cut into non-overlapping
chunks of `chunk` tokens; every token after a chunk's first is scored given the chunk before it
(LLM.score), perplexity = exp(mean NLL). The same is done for an untrained model (same config and
tokenizer, weights from model_init.init_weights) as the reference point. The MTP head is scored on the
same chunks: its top-1 accuracy for token t+2 from the main model's state at t and token t+1.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from .. import LLM, SamplingParams
from ..cache.state_cache import HybridCache
from ..forward_batch import Segment, build_batch
from ..layers.model import HybridModel
from ..weights.loader import load_model
from .data import read_text, source_files
from .export import save_checkpoint
from .model_init import init_weights

PROMPTS = ["def quicksort(", "import os\n", "class Stack:\n", "    for i in range("]


def held_out_chunks(tok: Tokenizer, files: list[Path], chunk: int) -> list[list[int]]:
    chunks = []
    for path in files:
        ids = tok.encode(read_text(path), add_special_tokens=False).ids
        chunks += [ids[i: i + chunk] for i in range(0, len(ids), chunk) if len(ids) - i > 1]
    return chunks


def perplexity(llm: LLM, chunks: list[list[int]]) -> tuple[float, int]:
    """(exp of mean next-token NLL, number of tokens scored) over the chunks."""
    nll, count = 0.0, 0
    for ids, logits in zip(chunks, llm.score(chunks)):
        nll += F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    return float(torch.tensor(nll / count).exp()), count


@torch.no_grad()
def mtp_accuracy(model: HybridModel, chunks: list[list[int]]) -> float:
    """Fraction of positions t where the MTP head's argmax is token t+2 (main model fed the true tokens)."""
    hits = total = 0
    for ids in (c for c in chunks if len(c) > 2):
        cache = HybridCache(model.cfg, 1, len(ids), torch.float32, mtp_layers=1)
        batch = build_batch([Segment(ids[:-2], 0, 0, 0)], 1, block_table=cache.block_table)
        hidden = model(batch, cache)
        draft = model.logits(model.mtp(hidden, model.embed(torch.tensor(ids[1:-1])), batch, cache.mtp_kv[0])).argmax(-1)
        hits += int((draft == torch.tensor(ids[2:])).sum())
        total += len(ids) - 2
    return hits / total


def untrained_copy(model_dir: Path, out: Path, seed: int) -> Path:
    """The trained checkpoint's config and tokenizer with freshly initialised weights."""
    model, cfg = load_model(model_dir)
    init_weights(model, cfg, torch.Generator().manual_seed(seed))
    config = json.loads((model_dir / "config.json").read_text())
    save_checkpoint(out, model, config, Tokenizer.from_file(str(model_dir / "tokenizer.json")), torch.float32)
    return out


def samples(llm: LLM, prompts: list[str], max_tokens: int) -> dict[str, str]:
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
    return {p: p + o.text for p, o in zip(prompts, outs)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, held_out = source_files()
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    chunks = held_out_chunks(tok, held_out, args.chunk)
    report = {"held_out_files": len(held_out)}
    llm = LLM(args.model, dtype="float32", max_model_len=max(args.chunk, 256) + args.max_tokens)
    report["trained_ppl"], report["tokens_scored"] = perplexity(llm, chunks)
    report["samples"] = samples(llm, PROMPTS, args.max_tokens)
    report["mtp_top1_accuracy"] = mtp_accuracy(load_model(args.model)[0], chunks)
    with tempfile.TemporaryDirectory() as tmp:
        untrained = LLM(untrained_copy(args.model, Path(tmp), args.seed), dtype="float32", max_model_len=max(args.chunk, 256) + args.max_tokens)
        report["untrained_ppl"], _ = perplexity(untrained, chunks)
        report["untrained_samples"] = samples(untrained, PROMPTS[:1], args.max_tokens)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
