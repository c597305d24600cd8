"""`deltaserve` command line: generate, perplexity, bench, check, serve, convert."""

from __future__ import annotations

import argparse
import sys

from ..weights import gguf_export
from . import bench, check, generate, perplexity


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaserve", description="Inference for hybrid Gated-DeltaNet models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (generate, perplexity, bench, check):
        module.register(sub)
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with parallel slots")
    from ..server.serve import add_serve_arguments, serve_from_args
    add_serve_arguments(serve)
    serve.set_defaults(func=serve_from_args)
    sub.add_parser("convert", add_help=False, help="write a GGUF file from a Hugging Face checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:  # the exporter owns its arguments
        return gguf_export.main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
