"""llguidance (what sambay's structured output uses) against the alternatives, xgrammar and
outlines-core, at the real vocabulary size (200064), on one core.

    python -m bench.structured_alternatives [--tokens 200] [--walks 5] [--compiles 3]

Every library gets its tokenizer from the same ``tokenizer.json`` (the synthetic 200064-token
byte-level vocabulary of :func:`bench.sampling_overhead.synthetic_tokenizer`, the way sambay
reads a GGUF's), and the same cases: JSON object mode, a nested JSON Schema (enums, arrays,
numbers, nested objects), a recursive GBNF grammar and a regular expression. Per case and
library it measures the compile time, the time to a matcher's first mask, and the mask of every
step while a fixed text that satisfies the constraint is fed back token by token (the text as
the tokenizer itself splits it: one byte a token in this vocabulary, which has no merges). Each
step checks that the next token is allowed (outside the timed part); a library that is not
installed, or that has no way to express a case, is skipped with the reason. Also records what
each library costs to install (the installed size of it and its runtime dependencies).

Writes bench/results/structured_alternatives.json and .md; reports, never asserts speed.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.sampling_overhead import N_VOCAB, synthetic_tokenizer
from sambay.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------- the cases

OBJECT_DOC = {"title": "Notes on the Analytical Engine", "year": 1843, "pages": 65.5, "translated": True,
              "author": {"name": "Ada Lovelace", "born": 1815, "places": ["London", "Ockham", "Horsley"]},
              "notes": ["A", "B", "C", "D", "E", "F", "G"], "cited_by": None,
              "sections": [{"n": 1, "words": 2519}, {"n": 2, "words": 1930}, {"n": 3, "words": 4012}]}

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "status": {"enum": ["draft", "review", "published"]},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "lines": {"type": "array", "items": {
            "type": "object",
            "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}, "price": {"type": "number"},
                           "unit": {"enum": ["kg", "piece", "litre"]}},
            "required": ["sku", "qty", "price", "unit"], "additionalProperties": False}},
        "shipping": {"type": "object",
                     "properties": {"city": {"type": "string"}, "express": {"type": "boolean"}},
                     "required": ["city", "express"], "additionalProperties": False},
    },
    "required": ["id", "status", "score", "tags", "lines", "shipping"],
    "additionalProperties": False,
}
SCHEMA_DOC = {"id": 40213, "status": "review", "score": 0.875, "tags": ["fragile", "gift", "priority mail"],
              "lines": [{"sku": "BK-1843-AE", "qty": 2, "price": 12.5, "unit": "piece"},
                        {"sku": "FL-0007", "qty": 3, "price": 1.25, "unit": "kg"},
                        {"sku": "OL-22", "qty": 1, "price": 7.99, "unit": "litre"}],
              "shipping": {"city": "London, Marylebone", "express": False}}

# arithmetic with nested parentheses: context-free (no regular expression can hold it)
GBNF = r'''root   ::= expr
expr   ::= term ((" + " | " - ") term)*
term   ::= factor ((" * " | " / ") factor)*
factor ::= [0-9]+ | "(" expr ")"
'''

# a route of steps: a regular language, which every library can take
ROUTE_REGEX = r"(north|south|east|west) [1-9][0-9]{0,2}( then (north|south|east|west) [1-9][0-9]{0,2})*\."


def _expression(rng: np.random.Generator, depth: int) -> str:
    """A random arithmetic expression in :data:`GBNF`'s language."""
    parts = []
    for i in range(int(rng.integers(2, 4))):
        if depth > 0 and rng.random() < 0.6:
            part = "(" + _expression(rng, depth - 1) + ")"
        else:
            part = str(int(rng.integers(0, 1000)))
        parts.append(part if i == 0 else str(rng.choice([" + ", " - ", " * ", " / "])) + part)
    return "".join(parts)


def _route(rng: np.random.Generator, steps: int) -> str:
    """A route in :data:`ROUTE_REGEX`'s language."""
    dirs = ["north", "south", "east", "west"]
    return " then ".join(f"{dirs[int(rng.integers(4))]} {int(rng.integers(1, 1000))}" for _ in range(steps)) + "."


def cases() -> dict[str, dict[str, Any]]:
    """Each case: its constraint in the forms the libraries take, and a text it accepts."""
    rng = np.random.default_rng(0)
    return {
        "json_object": {"what": "JSON object mode (any object)", "json_schema": {"type": "object"},
                        "text": json.dumps(OBJECT_DOC)},
        "json_schema": {"what": "nested JSON Schema (enums, arrays, numbers, nested objects)",
                        "json_schema": SCHEMA, "text": json.dumps(SCHEMA_DOC)},
        "gbnf": {"what": "GBNF grammar (arithmetic, nested parentheses)", "gbnf": GBNF,
                 "text": " + ".join(_expression(rng, 3) for _ in range(6))},
        "regex": {"what": "regular expression (a route of steps)", "regex": ROUTE_REGEX, "text": _route(rng, 40)},
    }


# ---------------------------------------------------------------------------------- tokens


def allowed(bits: np.ndarray, token: int) -> bool:
    """Whether ``token``'s bit is set in an int32 bitmask (the layout all three libraries use)."""
    words = bits.reshape(-1).view(np.uint32)
    return bool(words[token // 32] >> np.uint32(token % 32) & np.uint32(1))


# ---------------------------------------------------------------------------------- libraries


class Unsupported(Exception):
    """The library has no way to express a case."""


class Library:
    """One constrained-decoding library behind the same few calls."""

    name = ""
    dist = ""  # the package's distribution name

    def tokenizer(self, tok: Tokenizer) -> None:
        """Builds the library's tokenizer from ``tok``'s tokenizer.json (once)."""

    def compile(self, case: dict[str, Any]) -> Any:
        """The case's constraint, compiled as far as the library goes before a matcher."""
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        """A fresh matcher (one per generation)."""
        raise NotImplementedError

    def fill(self, matcher: Any, bits: np.ndarray) -> None:
        """Writes the allowed next tokens into ``bits``."""
        raise NotImplementedError

    def accept(self, matcher: Any, token: int) -> None:
        """Moves the matcher past ``token``."""
        raise NotImplementedError

    def end_tokens(self) -> list[int]:
        """The tokens that end a generation."""
        raise NotImplementedError


class Llguidance(Library):
    name, dist = "llguidance", "llguidance"

    def __init__(self) -> None:
        import llguidance  # noqa: F401 - ImportError: skipped

    def tokenizer(self, tok: Tokenizer) -> None:
        from sambay.structured import grammar_tokenizer

        self._tok = tok
        self._llg_tok = grammar_tokenizer(tok, N_VOCAB)  # sambay's own path

    def compile(self, case: dict[str, Any]) -> Any:
        import llguidance

        from sambay.structured import compile_grammar

        if "json_schema" in case:
            return compile_grammar(json_schema=case["json_schema"])
        if "gbnf" in case:
            return compile_grammar(grammar=case["gbnf"])
        return llguidance.grammar_from("regex", case["regex"])

    def matcher(self, compiled: Any) -> Any:
        import llguidance

        m = llguidance.LLMatcher(self._llg_tok, compiled, log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def fill(self, matcher: Any, bits: np.ndarray) -> None:
        matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)

    def accept(self, matcher: Any, token: int) -> None:
        if not matcher.consume_token(token):
            raise RuntimeError(matcher.get_error())

    def end_tokens(self) -> list[int]:
        return sorted(self._tok.eog_ids)


class Xgrammar(Library):
    name, dist = "xgrammar", "xgrammar"

    def __init__(self, threads: int) -> None:
        import xgrammar  # noqa: F401 - ImportError: skipped

        self._threads = threads

    def tokenizer(self, tok: Tokenizer) -> None:
        # xgrammar reads a transformers tokenizer; this one wraps the same tokenizer.json
        import xgrammar as xgr
        from tokenizers import Tokenizer as HFTokenizer
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tok.hf_json()))
        self._info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=N_VOCAB, stop_token_ids=sorted(tok.eog_ids))
        if self._info.vocab_type != xgr.VocabType.BYTE_LEVEL:
            raise RuntimeError(f"xgrammar read the vocabulary as {self._info.vocab_type}, not byte-level")
        # no cache: every compile is measured from scratch
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=self._threads, cache_enabled=False)

    def compile(self, case: dict[str, Any]) -> Any:
        if "json_schema" in case:  # the same layout as sambay's (json.dumps's separators)
            return self._compiler.compile_json_schema(json.dumps(case["json_schema"]), any_whitespace=False,
                                                      separators=(", ", ": "))
        if "gbnf" in case:  # xgrammar's EBNF is llama.cpp's GBNF
            return self._compiler.compile_grammar(case["gbnf"])
        return self._compiler.compile_regex(case["regex"])

    def matcher(self, compiled: Any) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bits: np.ndarray) -> None:
        matcher.fill_next_token_bitmask(bits)

    def accept(self, matcher: Any, token: int) -> None:
        if not matcher.accept_token(token):
            raise RuntimeError(f"xgrammar refused token {token}")

    def end_tokens(self) -> list[int]:
        return list(self._info.stop_token_ids)


class OutlinesCore(Library):
    name, dist = "outlines-core", "outlines-core"

    def __init__(self) -> None:
        import outlines_core  # noqa: F401 - ImportError: skipped

    def tokenizer(self, tok: Tokenizer) -> None:
        # outlines-core takes {token bytes: ids} (its from_pretrained reaches the Hub): the bytes
        # come from the same tokenizer.json through sambay's Tokenizer; the end token stays out
        import outlines_core

        self._eos = sorted(tok.eog_ids)[0]
        by_bytes: dict[bytes, list[int]] = {}
        for i in range(N_VOCAB):
            if i not in tok.eog_ids:
                by_bytes.setdefault(tok.token_bytes(i, special=True), []).append(i)
        self._vocab = outlines_core.Vocabulary(self._eos, by_bytes)

    def compile(self, case: dict[str, Any]) -> Any:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        if "gbnf" in case:
            raise Unsupported("no grammars: regular expressions and JSON Schema only")
        if "json_schema" in case:
            # one optional space where JSON allows whitespace (json.dumps writes ", " and ": ")
            regex = build_regex_from_schema(json.dumps(case["json_schema"]), whitespace_pattern="[ ]?")
        else:
            regex = case["regex"]
        return outlines_core.Index(regex, self._vocab)

    def matcher(self, compiled: Any) -> Any:
        import outlines_core

        return outlines_core.Guide(compiled)

    def fill(self, matcher: Any, bits: np.ndarray) -> None:
        matcher.write_mask_into(bits.ctypes.data, bits.size, bits.itemsize)

    def accept(self, matcher: Any, token: int) -> None:
        matcher.advance(token, return_tokens=False)

    def end_tokens(self) -> list[int]:
        return [self._eos]


LIBRARIES: dict[str, Callable[[argparse.Namespace], Library]] = {
    "llguidance": lambda a: Llguidance(),
    "xgrammar": lambda a: Xgrammar(a.threads),
    "outlines-core": lambda a: OutlinesCore(),
}

# What the package indexes offer for the versions measured (from `pip download --no-deps
# --only-binary=:all: --platform P` for each; sizes are the wheels' in MB). xgrammar also needs
# torch, whose CPU-only wheel for Linux x86-64 is 192 MB (PyPI's default build adds CUDA).
WHEELS = {
    "llguidance": {"version": "1.9.1", "linux_aarch64": "manylinux_2_31 (2.9 MB)",
                   "macos_arm64": "macosx_11_0 (3.1 MB)", "abi3": True},
    "xgrammar": {"version": "0.2.9", "linux_aarch64": "manylinux_2_28 (1.2 MB + apache-tvm-ffi 3.1 MB)",
                 "macos_arm64": "macosx_11_0 (1.3 MB + apache-tvm-ffi 5.4 MB)", "abi3": False},
    "outlines-core": {"version": "0.2.14", "linux_aarch64": "manylinux_2_28 (2.2 MB)",
                      "macos_arm64": "macosx_14_0 (2.1 MB)", "abi3": False},
}

# Interfaces, read from each package's API (checked by this bench where it uses them).
INTERFACES = {
    "llguidance": {"gbnf": "yes (converted to its Lark-like form)", "regex": "yes", "json_schema": "yes",
                   "numpy_mask": "yes: llguidance.numpy, or a pointer to any int32 buffer",
                   "tokenizer_from": "tokenizer.json text (no transformers)"},
    "xgrammar": {"gbnf": "yes (its EBNF is GBNF)", "regex": "yes", "json_schema": "yes",
                 "numpy_mask": "fills a NumPy int32 array (DLPack), but the package imports torch",
                 "tokenizer_from": "a transformers tokenizer, or a list of token strings and the vocabulary type"},
    "outlines-core": {"gbnf": "no (regular expressions; JSON Schema becomes one)", "regex": "yes",
                      "json_schema": "yes (nesting depth bounded by the regex, 3 by default)",
                      "numpy_mask": "a pointer to an int32 buffer (its NumPy helpers need numba)",
                      "tokenizer_from": "a {token bytes: ids} map, or the Hub"},
}


# ---------------------------------------------------------------------------------- install cost


def _requirements(dist: str) -> list[str]:
    """Runtime requirements of an installed distribution (markers evaluated here, no extras)."""
    from packaging.requirements import Requirement

    out = []
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req.name)
    return out


def install_cost(dist: str) -> dict[str, Any]:
    """The installed size of ``dist`` and of everything it needs at run time, on this machine."""
    seen: dict[str, float] = {}
    todo = [dist]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            d = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            seen[key] = float("nan")
            continue
        seen[key] = sum((f.size or 0) for f in d.files or []) / 1e6
        todo.extend(_requirements(name))
    own = seen.pop(dist.lower())
    return {"version": metadata.version(dist), "installed_mb": round(own, 1),
            "with_dependencies_mb": round(own + sum(v for v in seen.values() if v == v), 1),
            "dependencies": sorted(seen), "needs_torch": "torch" in seen}


# ---------------------------------------------------------------------------------- timing


def _quantiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs)
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "max": float(a.max())}


def measure(lib: Library, case: dict[str, Any], ids: list[int], *, compiles: int, walks: int,
            complete: bool) -> dict[str, Any]:
    """Compile ``compiles`` times, then feed ``ids`` through ``walks`` fresh matchers."""
    compile_ms, first_ms = [], []
    compiled = None
    for _ in range(compiles):
        t0 = time.perf_counter()
        compiled = lib.compile(case)
        t1 = time.perf_counter()
        m = lib.matcher(compiled)
        lib.fill(m, np.full((N_VOCAB + 31) // 32, -1, dtype=np.int32))
        t2 = time.perf_counter()
        compile_ms.append((t1 - t0) * 1e3)
        first_ms.append((t2 - t1) * 1e3)
    bits = np.full((N_VOCAB + 31) // 32, -1, dtype=np.int32)
    mask_ms: list[float] = []
    accept_ms: list[float] = []
    walk_means: list[float] = []
    n_allowed: list[int] = []
    for w in range(walks):
        m = lib.matcher(compiled)
        walk: list[float] = []
        for t in ids:
            a = time.perf_counter()
            lib.fill(m, bits)
            b = time.perf_counter()
            if not allowed(bits, t):
                raise RuntimeError(f"{lib.name} masked out token {t} of the case's text")
            if w == 0:
                n_allowed.append(int(np.unpackbits(bits.view(np.uint8)).sum()))
            c = time.perf_counter()
            lib.accept(m, t)
            d = time.perf_counter()
            walk.append((b - a) * 1e3)
            accept_ms.append((d - c) * 1e3)
        mask_ms += walk
        walk_means.append(statistics.fmean(walk))
        if complete:  # the whole text was fed: the grammar must let the generation end
            lib.fill(m, bits)
            if not any(allowed(bits, e) for e in lib.end_tokens()):
                raise RuntimeError(f"{lib.name} does not allow an end token after the case's whole text")
    return {
        "compile_ms": {"median": statistics.median(compile_ms), "min": min(compile_ms), "max": max(compile_ms)},
        "matcher_and_first_mask_ms": {"median": statistics.median(first_ms), "min": min(first_ms),
                                      "max": max(first_ms)},
        "mask_ms_per_token": _quantiles(mask_ms),
        "mask_ms_walk_mean": {"median": statistics.median(walk_means), "min": min(walk_means),
                              "max": max(walk_means)},
        "accept_ms_per_token": {"median": statistics.median(accept_ms)},
        "allowed_tokens_mean": statistics.fmean(n_allowed),
    }


# ---------------------------------------------------------------------------------- report


def forced_probe(lib: Library, case: dict[str, Any], tok: Tokenizer, prefix: str) -> dict[str, Any]:
    """The tokens allowed after ``prefix``, where the constraint forces what follows (llguidance
    then allows only the tokenizer's own split of the forced text; the others any token that
    fits)."""
    m = lib.matcher(lib.compile(case))
    for t in tok.encode(prefix):
        lib.accept(m, t)
    bits = np.full((N_VOCAB + 31) // 32, -1, dtype=np.int32)
    lib.fill(m, bits)
    ok = [t for t in range(N_VOCAB) if allowed(bits, t)]
    return {"prefix": prefix, "allowed": len(ok),
            "tokens": [tok.token_bytes(t, special=True).decode("utf-8", "replace") for t in ok[:12]]}


def to_markdown(res: dict[str, Any]) -> str:
    libs = list(res["libraries"])
    walked = f"up to {res['tokens']} tokens" if res["tokens"] else "the whole text"
    lines = [f"# Structured output: llguidance against the alternatives (vocab {res['n_vocab']})", "",
             f"{res['machine']}, one core; xgrammar's compiler with `max_threads={res['threads']}` and no cache; "
             f"{res['compiles']} compiles and {res['walks']} walks (a fresh matcher each) through "
             f"{walked} of each case; commit {res['commit']}.", "",
             "compile: from the schema or grammar text to what the library needs before a matcher (median of the "
             "compiles); first mask: a matcher and its first mask (llguidance compiles lazily, so its work is "
             "here); mask: the allowed-token bitmask at each step, as the mean over a walk (median and min-max "
             "of the walks) and per step (median, p90, max); allowed: tokens allowed per step, mean.", "",
             "| case | library | compile ms | first mask ms | mask ms/token, walk mean | per step median / p90 / max "
             "| allowed |", "|---|---|---:|---:|---:|---:|---:|"]
    for cname, case in res["cases"].items():
        for lib in libs:
            r = case["results"].get(lib)
            if r is None:
                continue
            if "skipped" in r:
                lines.append(f"| {cname} | {lib} | - | - | skipped: {r['skipped']} | | |")
                continue
            m, w = r["mask_ms_per_token"], r["mask_ms_walk_mean"]
            lines.append(f"| {cname} ({case['tokens']} tok) | {lib} | {r['compile_ms']['median']:.1f} "
                         f"| {r['matcher_and_first_mask_ms']['median']:.2f} "
                         f"| {w['median']:.3f} ({w['min']:.3f}-{w['max']:.3f}) "
                         f"| {m['median']:.3f} / {m['p90']:.3f} / {m['max']:.2f} | {r['allowed_tokens_mean']:.0f} |")
    probes = {lib: info["forced_probe"] for lib, info in res["libraries"].items() if "forced_probe" in info}
    if probes:
        lines += ["", "Tokens allowed where the constraint forces the text (the regex case after "
                  f"{next(iter(probes.values()))['prefix']!r}, which must go on with 'uth '):", ""]
        lines += [f"* {lib}: {p['allowed']}: {', '.join(repr(t) for t in p['tokens'])}" for lib, p in probes.items()]
    lines += ["", "| library | version | tokenizer build s | installed MB (with runtime deps) | needs torch "
              "| GBNF | NumPy mask | Linux aarch64 wheel | macOS arm64 wheel |", "|---|---|---:|---:|---|---|---|---|---|"]
    for lib, info in res["libraries"].items():
        if "skipped" in info:
            lines.append(f"| {lib} | not run: {info['skipped']} | | | | | | | |")
            continue
        c, i, wh = info["install"], INTERFACES[lib], WHEELS[lib]
        lines.append(f"| {lib} | {c['version']} | {info['tokenizer_s']:.2f} | {c['installed_mb']} "
                     f"({c['with_dependencies_mb']}) | {'yes' if c['needs_torch'] else 'no'} | {i['gbnf']} "
                     f"| {i['numpy_mask']} | {wh['linux_aarch64']} | {wh['macos_arm64']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=0, help="tokens per walk (default: the case's whole text)")
    ap.add_argument("--walks", type=int, default=5, help="walks through each case's text (a fresh matcher each)")
    ap.add_argument("--compiles", type=int, default=3, help="compiles of each case")
    ap.add_argument("--threads", type=int, default=1, help="xgrammar's compiler threads")
    ap.add_argument("--only", nargs="*", choices=list(LIBRARIES), help="run only these libraries")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    tok = synthetic_tokenizer(N_VOCAB)
    texts = cases()
    ids = {name: tok.encode(case["text"]) for name, case in texts.items()}
    libs: dict[str, Library] = {}
    res: dict[str, Any] = {"n_vocab": N_VOCAB, "tokens": args.tokens, "walks": args.walks,
                           "compiles": args.compiles, "threads": args.threads,
                           "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                    text=True).stdout.strip(),
                           "libraries": {}, "cases": {}}
    for name, make in LIBRARIES.items():
        if args.only and name not in args.only:
            continue
        try:
            lib = make(args)
        except ImportError as err:
            res["libraries"][name] = {"skipped": f"not importable: {err}"}
            print(f"{name}: skipped ({err})")
            continue
        t0 = time.perf_counter()
        lib.tokenizer(tok)
        res["libraries"][name] = {"tokenizer_s": time.perf_counter() - t0, "install": install_cost(lib.dist),
                                  "wheels": WHEELS[name], "interfaces": INTERFACES[name]}
        libs[name] = lib
        print(f"{name}: tokenizer built in {res['libraries'][name]['tokenizer_s']:.2f} s", flush=True)
    for cname, case in texts.items():
        walk = ids[cname][: args.tokens or None]
        entry: dict[str, Any] = {"what": case["what"], "tokens": len(walk),
                                 "text_bytes": len(case["text"].encode()), "results": {}}
        for name, lib in libs.items():
            try:
                entry["results"][name] = measure(lib, case, walk, compiles=args.compiles, walks=args.walks,
                                                 complete=len(walk) == len(ids[cname]))
            except Unsupported as why:
                entry["results"][name] = {"skipped": str(why)}
            r = entry["results"][name]
            print(f"{cname:12s} {name:14s} " + (f"skipped: {r['skipped']}" if "skipped" in r else
                  f"compile {r['compile_ms']['median']:8.1f} ms  first {r['matcher_and_first_mask_ms']['median']:7.2f}"
                  f" ms  mask {r['mask_ms_per_token']['median']:.3f} ms/token (p90 "
                  f"{r['mask_ms_per_token']['p90']:.3f})"), flush=True)
        res["cases"][cname] = entry
    for name, lib in libs.items():
        res["libraries"][name]["forced_probe"] = forced_probe(lib, texts["regex"], tok, "so")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured_alternatives.json").write_text(json.dumps(res, indent=2))
    md = to_markdown(res)
    (out / "structured_alternatives.md").write_text(md)
    print()
    print(md)


if __name__ == "__main__":
    main()
