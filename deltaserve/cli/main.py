"""`deltaserve` command line: generate, perplexity, bench, check, serve, convert."""

from __future__ import annotations

import argparse
import ctypes
import sys

from . import bench, check, generate, perplexity


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaserve", description="Inference for hybrid Gated-DeltaNet models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (generate, perplexity, bench, check):
        module.register(sub)
    sub.add_parser("serve", add_help=False, help="OpenAI-compatible HTTP server with parallel slots")
    sub.add_parser("convert", add_help=False, help="write a GGUF file from a Hugging Face checkpoint")
    return parser


def serve(argv: list[str]) -> int:
    """`deltaserve serve`: its own parser, so the server's imports (FastAPI, uvicorn: ~20 MB) load only for it."""
    from ..server.serve import add_serve_arguments, serve_from_args
    parser = argparse.ArgumentParser(prog="deltaserve serve", description="OpenAI-compatible HTTP server with "
                                                                          "parallel slots")
    add_serve_arguments(parser)
    return serve_from_args(parser.parse_args(argv)) or 0


def return_freed_memory() -> None:
    """Large freed buffers go back to the OS. glibc raises its mmap threshold whenever an mmap-backed buffer is freed
    (up to 32 MiB), after which buffers below it come from the heap and stay resident when freed: loading a
    quantized file, whose tensors are read, reordered and repacked one at a time, then peaked ~80 MB higher."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD: fixed at glibc's initial 128 KiB
    except OSError:  # not glibc
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return_freed_memory()
    if argv[:1] == ["convert"]:  # the exporter owns its arguments
        from ..weights import gguf_export
        return gguf_export.main(argv[1:])
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
