"""The ``sambay`` command line: pull, list, rm, convert, quantize, run, chat, serve, info,
system-info."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any, Optional, Sequence

from ._options import (add_chat_template_arguments, add_engine_arguments, add_thread_arguments, chat_template,
                       engine_kwargs, thread_kwargs)
from ._version import __version__
from .sampling import SamplingParams, file_sampling

# exit codes by exception type (never by message text); a closed stdout (`| head`) ends the
# command quietly with the status a SIGPIPE death gives
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 2, 130, 141


def _known_errors() -> tuple[type[BaseException], ...]:
    from .chat import ChatTemplateError
    from .convert import ConvertError
    from .errors import ComputeError, ContextFullError, LoadError, PullError, QuantizeError, StateError
    from .gguf_metadata import GGUFMetadataError
    from .server import MissingDependencyError
    from .tokenizer import TokenizerError

    return (MissingDependencyError, PullError, ConvertError, LoadError, QuantizeError, StateError, ContextFullError,
            ComputeError, ChatTemplateError, GGUFMetadataError, TokenizerError, ValueError, OSError)


# ---------------------------------------------------------------------------------------------
# commands


def _cmd_system_info(args: argparse.Namespace) -> int:
    from ._system import format_system_info, system_info

    print(format_system_info(system_info()))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import warnings

    from .convert import ConvertWarning, convert

    show = warnings.showwarning

    def one_line(message: Any, category: type[Warning], *rest: Any, **kw: Any) -> None:
        if issubclass(category, ConvertWarning):
            print(f"sambay convert: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("always", ConvertWarning)
        warnings.showwarning = one_line
        convert(args.hf_dir, args.output, outtype=args.outtype,
                allow_missing_tokenizer=args.no_tokenizer, progress=not args.quiet,
                strict=args.strict, repo_id=args.repo_id)
    if not args.quiet:
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .quantization import quantize

    result = quantize(args.input, args.output, args.type, n_threads=args.threads,
                      progress=not args.quiet and not args.dry_run, pure=args.pure,
                      output_tensor_type=args.output_tensor_type, token_embedding_type=args.token_embedding_type,
                      leave_output_tensor=args.leave_output_tensor, allow_requantize=args.allow_requantize,
                      dry_run=args.dry_run)
    if args.dry_run:  # the plan on stdout, one line per tensor
        mib = 2**20
        for name, old, new, n_in, n_out in result["plan"]:
            print(f"{name:40s} {old:>5s} -> {new:<5s} {n_in / mib:10.3f} -> {n_out / mib:10.3f} MiB")
        print(f"total: {result['bytes_in'] / mib:.2f} MiB -> {result['bytes_out'] / mib:.2f} MiB of tensor data "
              f"({len(result['plan'])} tensors; nothing written)")
        return 0
    if not args.quiet:
        mib_in, mib_out = result["bytes_in"] / 2**20, result["bytes_out"] / 2**20
        print(f"wrote {args.output}: {mib_in:.1f} MiB -> {mib_out:.1f} MiB of tensor data",
              file=sys.stderr)
    return 0


def _resolve(spec: str) -> str:
    """A -m value (a file, a cache name, or a Hugging Face repo id pulled on first use)."""
    from .cache import resolve_model

    return resolve_model(spec)


def _model_path(args: argparse.Namespace) -> str:
    """The -m model, -hf's, or the built-in demo model (announced in one line on stderr)."""
    if args.hf_repo is not None:
        from .hub import DEFAULT_QUANT, ensure

        repo, _, quant = args.hf_repo.partition(":")
        return str(ensure(repo, quant=quant or DEFAULT_QUANT, file=args.hf_file).path)
    if args.model is not None:
        return _resolve(args.model)
    from .demo import demo_model_path

    path = demo_model_path()
    print("sambay: no -m given, using the built-in demo model (a tiny SambaY that does "
          "multi-digit + - * with a worked trace)", file=sys.stderr)
    return path


def _load(args: argparse.Namespace) -> Any:
    from .llama import Llama

    return Llama(_model_path(args), n_ctx=args.ctx_size, n_batch=args.batch_size,
                 **thread_kwargs(args), n_gpu_layers=args.n_gpu_layers, seed=args.seed,
                 device="cpu" if args.cpu else "auto", verbose=False, chat_template=chat_template(args),
                 **engine_kwargs(args))


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options given on the command line (the rest take the Llama's defaults)."""
    given = {"temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p,
             "min_p": args.min_p, "repeat_penalty": args.repeat_penalty,
             "presence_penalty": args.presence_penalty,
             "frequency_penalty": args.frequency_penalty, "penalty_last_n": args.repeat_last_n,
             "typical_p": args.typical, "mirostat_mode": args.mirostat,
             "mirostat_eta": args.mirostat_lr, "mirostat_tau": args.mirostat_ent}
    return {k: v for k, v in given.items() if v is not None}


def _constraint_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``--json-schema`` / ``--json-schema-file`` / ``--grammar`` / ``--grammar-file`` as the
    API's ``json_schema`` / ``grammar`` (llama.cpp's options; the API checks them)."""
    kw: dict[str, Any] = {}
    if args.json_schema is not None:
        kw["json_schema"] = args.json_schema
    if args.json_schema_file is not None:
        with open(args.json_schema_file, encoding="utf-8") as f:
            kw["json_schema"] = f.read()
    if args.grammar is not None:
        kw["grammar"] = args.grammar
    if args.grammar_file is not None:
        with open(args.grammar_file, encoding="utf-8") as f:
            kw["grammar"] = f.read()
    return kw


def _report_speed(llm: Any) -> None:
    t = llm.last_timings
    pp = t.prompt_evaluated / t.prompt_seconds if t.prompt_seconds > 0 else float("nan")
    tg = t.generated_tokens / t.generate_seconds if t.generate_seconds > 0 else float("nan")
    print(f"\n[prompt: {t.prompt_tokens} tokens ({t.prompt_evaluated} evaluated), {pp:.1f} tok/s | "
          f"generation: {t.generated_tokens} tokens, {tg:.1f} tok/s | device: {llm.device}]",
          file=sys.stderr)


def _prompt_text(args: argparse.Namespace) -> str:
    """The -p text or the -f file's, decoded alike (as the API decodes bytes): UTF-8, each
    invalid byte becoming U+FFFD."""
    if args.prompt is None and args.file is None:
        raise ValueError("give a prompt with -p TEXT or -f FILE")
    if args.prompt is not None:
        raw = os.fsencode(args.prompt)  # the bytes given, undoing argv's surrogateescape
    else:
        with open(args.file, "rb") as f:
            raw = f.read()
    return raw.decode("utf-8", errors="replace")


def _cmd_run(args: argparse.Namespace) -> int:
    if args.conversation:  # llama-cli's -cnv: a chat, the -p text as its system prompt
        if args.prompt is not None or args.file is not None:
            args.system = args.system or _prompt_text(args)
        return _cmd_chat(args)
    if args.raw and (args.chat_template is not None or args.chat_template_file is not None):
        raise ValueError("--raw renders no chat template: leave out --chat-template/--chat-template-file")
    prompt = _prompt_text(args)
    llm = _load(args)
    kw = dict(_sampling_kwargs(args), max_tokens=args.n_predict, stream=True,
              stop=args.stop or None, **_constraint_kwargs(args))
    use_chat = not args.raw and llm.chat_template
    if use_chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        from .terminal import ReplyPrinter

        printer = ReplyPrinter(sys.stdout, show_thinking=not args.hide_thinking)
        for chunk in llm.create_chat_completion(messages, reasoning_budget=args.reasoning_budget, **kw):
            printer.write(chunk["choices"][0]["delta"])
        printer.finish()
    else:
        for chunk in llm.create_completion(prompt, **kw):
            sys.stdout.write(chunk["choices"][0]["text"])
            sys.stdout.flush()
        sys.stdout.write("\n")
    if not args.quiet:
        _report_speed(llm)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from .terminal import run_chat

    llm = _load(args)
    # `run -cnv` comes here too, with run's options (no --keep-thinking or --verbose-speed)
    return run_chat(llm, system=args.system, show_thinking=not args.hide_thinking,
                    keep_thinking=getattr(args, "keep_thinking", False), max_tokens=args.n_predict,
                    completion_kwargs=dict(reasoning_budget=args.reasoning_budget, **_sampling_kwargs(args),
                                           **_constraint_kwargs(args)),
                    after_reply=(lambda: _report_speed(llm)) if getattr(args, "verbose_speed", False) else None)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import from_args, serve
    from .server.settings import check_ray_arguments

    check_ray_arguments(args)
    spec, args.model = args.model, _resolve(args.model)
    if args.model_alias is None and args.model != spec:
        args.model_alias = spec  # a cache name or repo id, not the cache's file name
    if args.ray:  # replicas on a Ray cluster (sambay.ray_serve)
        try:
            from .ray_serve import serve_on_ray
        except ImportError as err:
            if not (err.name or "").startswith("ray"):
                raise
            from .server import MissingDependencyError
            raise MissingDependencyError(f'--ray needs Ray Serve (missing: {err.name}): pip install "sambay[ray]"')
        return serve_on_ray(from_args(args), replicas=args.replicas or 1, autoscale=args.autoscale,
                            address=args.address)
    return serve(from_args(args))


def _cmd_pull(args: argparse.Namespace) -> int:
    from .hub import pull

    entry = pull(args.repo, quant=args.quant, revision=args.revision, file=args.file,
                 name=args.name, keep_hf=args.keep_hf, progress=not args.quiet)
    print(entry.ref)
    if not args.quiet:
        print(f"sambay pull: {entry.repo}@{entry.revision[:10]} -> {entry.path} "
              f"({entry.size / 2**20:.1f} MiB); run it with: sambay run -m {entry.ref} -p ...",
              file=sys.stderr)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .cache import cache_root, list_entries

    rows = [(e.ref, e.type, f"{e.size / 2**20:.1f} MiB", e.repo, e.revision[:10], e.created[:10])
            for e in list_entries()]
    if not rows:
        print(f"no models in {cache_root()} (get one with: sambay pull)", file=sys.stderr)
        return 0
    head = ("NAME", "TYPE", "SIZE", "SOURCE", "REVISION", "DATE")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    from .cache import remove_entry

    for ref in args.names:
        entry = remove_entry(ref)
        print(f"removed {entry.ref} ({entry.size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import gguf

    from .engine import ARCH, LAYER_KINDS
    from .gguf_metadata import GGUFMetadataError, read_metadata

    args.model = _resolve(args.model)
    meta = read_metadata(args.model)
    arch = meta.get("general.architecture")
    print(f"file: {args.model} ({os.path.getsize(args.model) / 2**20:.1f} MiB)")
    print(f"architecture: {arch}   name: {meta.get('general.name', '?')}   "
          f"file_type: {meta.get('general.file_type', '?')}")
    if arch != ARCH:
        raise GGUFMetadataError(f"not a {ARCH} model (architecture {arch!r})")
    p = ARCH + "."
    keys = ["context_length", "embedding_length", "block_count", "feed_forward_length",
            "vocab_size", "attention.head_count", "attention.head_count_kv",
            "attention.key_length", "attention.sliding_window", "ssm.inner_size",
            "ssm.state_size", "ssm.conv_kernel", "ssm.time_step_rank", "memory_layer",
            "kv_shared_layer"]
    for k in keys:
        print(f"  {k:28s} {meta.get(p + k, '-')}")
    kinds = [LAYER_KINDS[int(k)] if 0 <= int(k) < len(LAYER_KINDS) else str(k)
             for k in meta.get(p + "layer_types", [])]
    print("layers: " + " ".join(f"{i}:{k}" for i, k in enumerate(kinds)))

    reader = gguf.GGUFReader(args.model, "r")
    by_type: dict[str, list[int]] = {}
    for t in reader.tensors:
        entry = by_type.setdefault(t.tensor_type.name, [0, 0])
        entry[0] += 1
        entry[1] += int(t.n_bytes)
    print("tensor types: " + ", ".join(f"{name} x{n} ({b / 2**20:.1f} MiB)"
                                       for name, (n, b) in sorted(by_type.items())))
    _print_memory(args.model, args.ctx_size, args.batch_size)
    given = file_sampling(meta)
    params = SamplingParams.from_metadata(meta)
    print("sampling defaults: " + ", ".join(
        f"{name} {getattr(params, name)}" + (" (file)" if name in given else "")
        for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")))
    tmpl = meta.get("tokenizer.chat_template")
    print(f"tokenizer: {meta.get('tokenizer.ggml.model', 'none')} / "
          f"{meta.get('tokenizer.ggml.pre', '-')}, {len(meta.get('tokenizer.ggml.tokens', []))} tokens, "
          f"chat template: {'yes' if tmpl else 'no'}")
    return 0


def _print_memory(path: str, n_ctx: int, n_batch: int) -> None:
    """The memory a context of these settings takes, as the engine allocates it (a context is
    made and measured: Context.memory_breakdown), on the CPU with f16 caches."""
    from .engine import ComputeError, Context, Model

    model = Model(path, device="cpu", use_extra_bufts=False)
    head = f"memory at n_ctx={n_ctx or model.n_ctx_train}, n_batch={n_batch} (CPU, f16 KV)"
    try:
        mem = Context(model, n_ctx=n_ctx, n_batch=n_batch, kv_type="f16", n_threads=1).memory_breakdown()
    except ComputeError as e:
        print(f"{head}: does not fit here: {e}")
        return
    parts = ("weights", "mamba_conv", "mamba_ssm", "swa_kv", "full_kv", "compute")
    total = sum(mem[k] for k in parts)
    print(f"{head}: " + ", ".join(f"{k} {mem[k] / 2**20:.2f} MiB" for k in parts)
          + f", total {total / 2**20:.2f} MiB")


# ---------------------------------------------------------------------------------------------
# parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="a phi4flash GGUF file, a cached model (phi4-flash:q4_k_m) or a Hugging "
                        "Face repo id OWNER/NAME[:QUANT], pulled on first use (default: the "
                        "built-in demo model)")
    p.add_argument("-hf", "-hfr", "--hf-repo", default=None, metavar="REPO[:QUANT]",
                   help="a Hugging Face repo id, pulled into the cache on first use")
    p.add_argument("-hff", "--hf-file", default=None, metavar="PATTERN",
                   help="with -hf: the GGUF file of a repository of GGUF files")
    p.add_argument("-c", "--ctx-size", type=int, default=4096,
                   help="context length (0: the model's trained context, 65536 for the real model)")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="prompt tokens per step")
    add_thread_arguments(p)
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", type=int, default=-1,
                   help="layers on the GPU if any (-1: all)")
    p.add_argument("--cpu", action="store_true", help="compute on the CPU even if a GPU exists")
    add_engine_arguments(p)
    add_chat_template_arguments(p)
    p.add_argument("-n", "--n-predict", "--predict", type=int, default=512,
                   help="max tokens to generate (<= 0: until the context is full)")
    p.add_argument("-s", "--seed", type=int, default=None, help="sampling seed (default and -1: random)")
    # sampling: left out, the model file's recommended value (general.sampling.*), else the
    # library's default (SamplingParams)
    d = SamplingParams()
    p.add_argument("--temp", type=float, default=None,
                   help=f"temperature, 0: greedy (default: the model file's, else {d.temperature})")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"sample among the K most likely tokens, 0: all (default: the file's, else {d.top_k})")
    p.add_argument("--top-p", type=float, default=None,
                   help=f"nucleus sampling, 1: off (default: the file's, else {d.top_p})")
    p.add_argument("--min-p", type=float, default=None,
                   help=f"drop tokens below P times the top one's probability, 0: off "
                        f"(default: the file's, else {d.min_p})")
    p.add_argument("--repeat-penalty", type=float, default=None,
                   help=f"penalise repeated tokens, 1: off (default: the file's, else {d.repeat_penalty})")
    p.add_argument("--presence-penalty", type=float, default=None,
                   help=f"OpenAI's presence penalty, 0: off (default: {d.presence_penalty})")
    p.add_argument("--frequency-penalty", type=float, default=None,
                   help=f"OpenAI's frequency penalty, 0: off (default: {d.frequency_penalty})")
    p.add_argument("--repeat-last-n", type=int, default=None, metavar="N",
                   help=f"recent tokens the penalties look at, -1: all (default: the file's, else {d.penalty_last_n})")
    p.add_argument("--typical", type=float, default=None, metavar="P",
                   help=f"locally typical sampling, 1: off (default: {d.typical_p})")
    p.add_argument("--mirostat", type=int, default=None, choices=[0, 1, 2],
                   help=f"Mirostat sampling, 1 or 2 (0: off; default: {d.mirostat})")
    p.add_argument("--mirostat-lr", type=float, default=None, metavar="ETA",
                   help=f"Mirostat learning rate (default: {d.mirostat_eta})")
    p.add_argument("--mirostat-ent", type=float, default=None, metavar="TAU",
                   help=f"Mirostat target entropy (default: {d.mirostat_tau})")
    p.add_argument("-sys", "--system", "--system-prompt", default=None, help="a system message")
    p.add_argument("--hide-thinking", action="store_true",
                   help="do not show the <think> trace (shown dimmed on a terminal otherwise)")
    p.add_argument("--reasoning-budget", type=int, default=None, metavar="N",
                   help="end the trace after N tokens by forcing </think> (default: unlimited)")
    # structured output (needs sambay[structured]); one of them, applied after the trace
    g = p.add_mutually_exclusive_group()
    g.add_argument("-j", "--json-schema", default=None, metavar="SCHEMA",
                   help="hold the answer to this JSON Schema (JSON text; '{}': any JSON)")
    g.add_argument("-jf", "--json-schema-file", default=None, metavar="FILE", help="the same, from a file")
    g.add_argument("--grammar", default=None, metavar="GBNF", help="hold the answer to this GBNF grammar")
    g.add_argument("--grammar-file", default=None, metavar="FILE", help="the same, from a file")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written, and every option's default shown (unless its help already
    says it, or there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        text = action.help or ""
        default = action.default
        if ("default" in text or "%(default)" in text or not action.option_strings
                or default in (None, False, argparse.SUPPRESS) or default == []):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _Parser(argparse.ArgumentParser):
    """No prefix matching of long options (llama.cpp's spellings must never be read as
    abbreviations of others), and the formatter above; subcommands' parsers are of this class
    too (argparse makes them with the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sambay", description="Run Phi-4-mini-flash-reasoning (SambaY) GGUF models on ggml.")
    parser.add_argument("--version", action="version", version=f"sambay {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and ggml's log on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ex = _HelpFormatter

    p = sub.add_parser("system-info", help="versions, CPU features, backends and devices",
                       formatter_class=ex, epilog="example:\n  sambay system-info")
    p.set_defaults(func=_cmd_system_info)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint folder to GGUF", formatter_class=ex,
                       epilog="example:\n  sambay convert ./Phi-4-mini-flash-reasoning phi4-flash-bf16.gguf")
    p.add_argument("hf_dir", help="folder with config.json, *.safetensors and tokenizer files")
    p.add_argument("output", help="the GGUF file to write")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16", "auto"], default="auto",
                   help="type of the large matrices (auto: the checkpoint's own); norms, biases "
                        "and SSM constants are always f32")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="convert even when the tokenizer files are missing (no vocabulary in the GGUF)")
    p.add_argument("--strict", action="store_true",
                   help="refuse a checkpoint with NaN/Inf weights or values the output type "
                        "cannot hold (F16 beyond 65504); without it they are written with a warning")
    p.add_argument("--repo-id", default=None, metavar="OWNER/NAME",
                   help="the Hugging Face repository the folder came from (names the model in "
                        "general.* and is recorded as its source)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    from ._native import _core

    types = [name for name, _, _ in _core.quantize_ftypes()]
    type_ids = [f"{name} ({code})" for name, code, _ in _core.quantize_ftypes()]
    from .hub import DEFAULT_QUANT, DEFAULT_REPO

    p = sub.add_parser("pull", help="download, convert and quantize a model into the cache (needs sambay[hub])",
                       formatter_class=ex,
                       epilog="examples:\n  sambay pull                       (" + DEFAULT_REPO + ", "
                              + DEFAULT_QUANT + ")\n  sambay pull --quant Q8_0\n"
                              "  sambay pull OWNER/NAME-GGUF --file '*Q4_K_M.gguf'\n"
                              "then: sambay run -m phi4-flash:q4_k_m -p \"What is 17 * 23?\"")
    p.add_argument("repo", nargs="?", default=DEFAULT_REPO, help=f"a Hugging Face repo id (default: {DEFAULT_REPO})")
    p.add_argument("--quant", default=DEFAULT_QUANT, metavar="TYPE",
                   help="the cached type, one of: " + ", ".join(types) + f" (default: {DEFAULT_QUANT})")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: the default branch)")
    p.add_argument("--file", default=None, metavar="PATTERN",
                   help="a repository of GGUF files: the file to take (name or glob)")
    p.add_argument("--name", default=None, help="the cache name (default: phi4-flash for the official "
                                                "repository, else the repository's name)")
    p.add_argument("--keep-hf", action="store_true",
                   help="keep the downloaded checkpoint in the Hugging Face cache")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser("list", help="the models in the cache", formatter_class=ex,
                       epilog="example:\n  sambay list")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("rm", help="remove models from the cache", formatter_class=ex,
                       epilog="example:\n  sambay rm phi4-flash:q4_k_m")
    p.add_argument("names", nargs="+", metavar="NAME", help="NAME:TAG as `sambay list` shows it")
    p.set_defaults(func=_cmd_rm)
    p = sub.add_parser("quantize", help="quantize a GGUF file", formatter_class=ex,
                       epilog="example:\n  sambay quantize phi4-flash-bf16.gguf phi4-flash-q4_k_m.gguf Q4_K_M")
    p.add_argument("input", help="an F32, F16 or BF16 GGUF from `sambay convert`")
    p.add_argument("output", help="the GGUF file to write")
    p.add_argument("type", metavar="TYPE",
                   help="one of: " + ", ".join(type_ids) + "; by name or llama-quantize's numeric id; "
                        "Q4_K and Q5_K are Q4_K_M and Q5_K_M")
    p.add_argument("-t", "--threads", type=int, default=None, help="worker threads (default and 0: all)")
    p.add_argument("--pure", action="store_true",
                   help="every quantized matrix in TYPE's default type (none raised: embedding, attn_qkv, ffn_down)")
    p.add_argument("--output-tensor-type", default=None, metavar="GGML_TYPE",
                   help="the output projection's type (q8_0, q6_K, f16, ...; the tied embedding in a model "
                        "without output.weight)")
    p.add_argument("--token-embedding-type", default=None, metavar="GGML_TYPE", help="token_embd.weight's type")
    p.add_argument("--leave-output-tensor", action="store_true", help="keep the output projection as stored")
    p.add_argument("--allow-requantize", action="store_true",
                   help="accept an already quantized input (the errors of both quantizations add up)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the per-tensor plan and the sizes; write nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("run", help="generate from a prompt, streaming to stdout", formatter_class=ex,
                       epilog="examples:\n  sambay run -p \"What is 347 + 582?\"   (the built-in demo model)\n"
                              "  sambay run -m model.gguf -p \"What is 17 * 23?\"\n"
                              "  sambay run -m model.gguf -f prompt.txt --raw -n 64 --temp 0")
    _add_model_args(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("-p", "--prompt", default=None, help="the prompt text")
    source.add_argument("-f", "--file", default=None, help="read the prompt from a file")
    p.add_argument("--raw", action="store_true", help="plain completion (no chat template)")
    p.add_argument("-r", "--reverse-prompt", "--stop", dest="stop", action="append", default=[],
                   help="a stop string (repeatable)")
    p.add_argument("-cnv", "--conversation", action="store_true",
                   help="chat interactively instead (as `sambay chat`; the -p/-f text becomes the system prompt)")
    p.add_argument("-no-cnv", "--no-conversation", action="store_false", dest="conversation",
                   help="one answer to -p/-f and exit (what run does without -cnv)")
    p.add_argument("-q", "--quiet", action="store_true", help="no speed report")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("chat", help="interactive chat (also reads turns from piped stdin)",
                       formatter_class=ex,
                       epilog="examples:\n  sambay chat -m model.gguf\n"
                              "  printf 'hi\\nwhat is 2+2?\\n' | sambay chat -m model.gguf --temp 0\n"
                              "in the chat, /help lists the commands (/bye, /clear, /save FILE, /load FILE)")
    _add_model_args(p)
    p.add_argument("--verbose-speed", action="store_true", help="print speeds after each reply")
    p.add_argument("--keep-thinking", action="store_true",
                   help="keep each reply's <think> trace in the history of the next turns "
                        "(default: only the answers)")
    p.set_defaults(func=_cmd_chat)

    from .server.settings import add_arguments as add_server_arguments

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs sambay[server])",
                       formatter_class=ex,
                       epilog="examples:\n  sambay serve -m model.gguf\n"
                              "  sambay serve -m model.gguf --parallel 4 --api-key secret --port 8080\n"
                              "  sambay serve -m model.gguf --ray --replicas 2 --address auto\n"
                              "then point an OpenAI client at http://127.0.0.1:8000/v1")
    add_server_arguments(p, ray=True)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("info", help="metadata, layer schedule, tensor types, memory estimate",
                       formatter_class=ex, epilog="example:\n  sambay info -m model.gguf -c 32768")
    p.add_argument("-m", "--model", required=True,
                   help="a GGUF file, a cached model or a Hugging Face repo id")
    p.add_argument("-c", "--ctx-size", type=_non_negative_int, default=0,
                   help="context for the memory figures (0: trained)")
    p.add_argument("-b", "--batch-size", type=_positive_int, default=512,
                   help="micro-batch size for the memory figures (as run's -b)")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away: no message; stdout points at devnull so that the interpreter's
        # final flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except _known_errors() as err:
        if args.debug:
            traceback.print_exc()
        print(f"sambay {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
