"""Command-line options that ``sambay run``/``chat`` and ``sambay serve`` share, defined once
(llama.cpp's spellings), and what they mean as :class:`sambay.Llama` keywords. Importable without
the server's dependencies."""

from __future__ import annotations

import argparse
from typing import Any, Optional


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """``-fa``, ``-ctk``, ``-ctv`` and ``--no-mmap`` (read back by :func:`engine_kwargs`)."""
    p.add_argument("-fa", "--flash-attn", nargs="?", const="on", default="auto", choices=["on", "off", "auto"],
                   help="ggml's fused attention kernel (auto: off, the default path; -fa alone: on)")
    p.add_argument("-ctk", "--cache-type-k", default=None, metavar="TYPE",
                   help="attention cache type: f16, bf16 or f32 (one type for K and V; default: f16)")
    p.add_argument("-ctv", "--cache-type-v", default=None, metavar="TYPE", help="the same as -ctk")
    p.add_argument("--no-mmap", action="store_true",
                   help="read the weights into memory (huge pages on Linux) instead of mapping the file: "
                        "more resident memory, faster decode on CPU")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`sambay.Llama` keywords of :func:`add_engine_arguments`' options."""
    return {"flash_attn": args.flash_attn == "on", "type_k": args.cache_type_k, "type_v": args.cache_type_v,
            "use_mmap": not args.no_mmap}


def add_thread_arguments(p: argparse.ArgumentParser) -> None:
    """``-t`` and ``-tb`` (read back by :func:`thread_kwargs`)."""
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="threads for steps of one token (default: the engine adapts the count by timing, "
                        "within the usable cores; 0: all cores; N: exactly N)")
    p.add_argument("-tb", "--threads-batch", type=int, default=None,
                   help="threads for steps of several tokens: prompts, or several sequences (default: "
                        "-t's value when given, else adapted)")


def thread_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``n_threads``/``n_threads_batch`` keywords of :func:`add_thread_arguments`' options:
    as llama.cpp, ``-tb`` defaults to ``-t`` (``-t 1`` alone means one thread throughout)."""
    batch = args.threads_batch if args.threads_batch is not None else args.threads
    return {"n_threads": args.threads, "n_threads_batch": batch}


def add_chat_template_arguments(p: argparse.ArgumentParser) -> None:
    """``--chat-template`` and ``--chat-template-file`` (read back by :func:`chat_template`)."""
    from .chat import BUILTIN_TEMPLATES

    g = p.add_mutually_exclusive_group()
    g.add_argument("--chat-template", default=None, metavar="NAME_OR_JINJA",
                   help="the chat template to use instead of the model file's: one of "
                        f"{', '.join(BUILTIN_TEMPLATES)} (llama.cpp's formats) or Jinja text")
    g.add_argument("--chat-template-file", default=None, metavar="FILE",
                   help="the same, a Jinja template read from a file")


def chat_template(args: argparse.Namespace) -> Optional[str]:
    """The ``chat_template`` keyword of :class:`sambay.Llama` that the options give: the name or
    Jinja text of ``--chat-template``, or the text of ``--chat-template-file``; None: the model
    file's own.

    Raises:
        sambay.ChatTemplateError: the file cannot be read or does not compile (the message
            names it).
        ValueError: both options are set (possible through environment variables).
    """
    from .chat import read_template_file

    if args.chat_template is not None and args.chat_template_file is not None:
        raise ValueError("give --chat-template or --chat-template-file, not both")
    if args.chat_template_file is not None:
        return read_template_file(args.chat_template_file)
    return args.chat_template
