"""Arguments and helpers shared by the subcommands (flags follow llama.cpp where they fit)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..engine.llm_engine import LLMEngine
from ..models import DEFAULT_MODEL



def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=str(DEFAULT_MODEL),
                   help="checkpoint directory with config.json + safetensors (default: the embedded model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype of the weights (default float32; recurrent state is always float32)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                   help="processes the model is split over by heads (gloo on the CPU, NCCL on CUDA; default 1)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")


def add_spec_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec-tokens", type=int, default=0,
                   help="MTP speculative decoding: draft tokens per step (0 = off; needs mtp.* weights)")


def make_engine(args: argparse.Namespace, **limits) -> LLMEngine:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (Path(args.model) / "config.json").is_file() and not str(args.model).endswith(".gguf"):
        raise SystemExit(f"deltaserve: no model at {args.model} (expected a checkpoint directory or a .gguf file)")
    return LLMEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                     tensor_parallel_size=args.tensor_parallel_size, **limits)


def emit_json(obj: dict) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def parse_ids(text: str) -> list[int]:
    """'1,2, 3' -> [1, 2, 3]"""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise SystemExit(f"deltaserve: token ids must be comma-separated integers, got {text!r}") from None


def prompt_tokens(args: argparse.Namespace, engine: LLMEngine) -> list[int]:
    """The prompt from -p TEXT, -f FILE or --prompt-ids, as token ids."""
    if args.prompt_ids:
        return parse_ids(args.prompt_ids)
    text = Path(args.file).read_text() if args.file else args.prompt
    if text is None:
        raise SystemExit("deltaserve: give a prompt with -p TEXT, -f FILE or --prompt-ids IDS")
    if engine.tokenizer is None:
        raise SystemExit("deltaserve: this model has no tokenizer.json; pass --prompt-ids")
    return engine.tokenizer.encode(text)
