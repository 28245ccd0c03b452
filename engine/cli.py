"""The `pdserve` command. Each subcommand is one `_cmd_*` function that declares its arguments
and returns the function that runs it; add it to COMMANDS. Heavy imports stay inside runners
so that `pdserve --help` is instant."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Runner = Callable[[argparse.Namespace], int]


def _cmd_make_tiny_model(p: argparse.ArgumentParser) -> Runner:
    """Write the deterministic tiny random model (config, safetensors, tokenizer)."""
    p.add_argument(
        "dir",
        nargs="?",
        default=None,
        help="output directory (default: $PDSERVE_HOME/models/tiny-FAMILY)",
    )
    p.add_argument("--family", choices=["llama", "mistral", "qwen2"], default="llama")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp8", choices=["channel", "tensor"], default=None,
                   help="write it pre-quantized to fp8 (compressed-tensors, weight scales per "
                        "channel or per tensor, activations per token; docs/fp8.md)")

    def run(args: argparse.Namespace) -> int:
        import tempfile

        from engine.tiny_fp8 import make_fp8_checkpoint
        from engine.tiny_model import default_tiny_model_dir, make_tiny_model

        out_dir = args.dir or default_tiny_model_dir(args.family)
        if args.fp8 is None:
            print(make_tiny_model(out_dir, family=args.family, seed=args.seed))
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            src = make_tiny_model(tmp, family=args.family, seed=args.seed)
            print(make_fp8_checkpoint(src, out_dir, strategy=args.fp8))
        return 0

    return run


COMMANDS: dict[str, Callable[[argparse.ArgumentParser], Runner]] = {
    "make-tiny-model": _cmd_make_tiny_model,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, declare in COMMANDS.items():
        doc = (declare.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc, description=doc)
        p.set_defaults(run=declare(p))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
