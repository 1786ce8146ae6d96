"""The ``sambay`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ._version import __version__


def _cmd_system_info(args: argparse.Namespace) -> int:
    from ._system import format_system_info, system_info

    print(format_system_info(system_info()))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import ConvertError, convert

    try:
        convert(
            args.hf_dir,
            args.output,
            outtype=args.outtype,
            allow_missing_tokenizer=args.no_tokenizer,
            progress=not args.quiet,
        )
    except ConvertError as err:
        print(f"sambay convert: error: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import QuantizeError, quantize

    try:
        result = quantize(args.input, args.output, args.type, n_threads=args.threads,
                          progress=not args.quiet)
    except (QuantizeError, ValueError) as err:
        print(f"sambay quantize: error: {err}", file=sys.stderr)
        return 1
    if not args.quiet:
        mib_in, mib_out = result["bytes_in"] / 2**20, result["bytes_out"] / 2**20
        print(f"wrote {args.output}: {mib_in:.1f} MiB -> {mib_out:.1f} MiB of tensor data",
              file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sambay", description="Run Phi-4-mini-flash-reasoning (SambaY) GGUF models on ggml."
    )
    parser.add_argument("--version", action="version", version=f"sambay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("system-info", help="versions, CPU features, backends and devices")
    p.set_defaults(func=_cmd_system_info)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint folder to GGUF")
    p.add_argument("hf_dir", help="folder with config.json, *.safetensors and tokenizer files")
    p.add_argument("output", help="the GGUF file to write")
    p.add_argument(
        "--outtype",
        choices=["f32", "f16", "bf16", "auto"],
        default="auto",
        help="type of the large matrices (auto: the checkpoint's own, bf16 stays bf16); "
        "norms, biases and SSM constants are always f32",
    )
    p.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="convert even when the tokenizer files are missing (the GGUF then has no vocabulary)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    from ._native import _core

    types = [name for name, _, _ in _core.quantize_ftypes()]
    p = sub.add_parser(
        "quantize",
        help="quantize a GGUF file",
        epilog="example: sambay quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M",
    )
    p.add_argument("input", help="an F32, F16 or BF16 GGUF from `sambay convert`")
    p.add_argument("output", help="the GGUF file to write")
    p.add_argument("type", metavar="TYPE", help="one of: " + ", ".join(types))
    p.add_argument("-t", "--threads", type=int, default=None, help="worker threads (default: all)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_quantize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
