"""The GGUF fuzzer's quick, deterministic slice and the regression corpus (issue 8).

Each input runs in the fuzzer's worker subprocess (a crash cannot take pytest down): it must
either load (then two tokens are evaluated, the tokenizer rebuilt, the chat template rendered)
or raise exactly sambay.LoadError with a message. The long sanitizer runs are fuzz/README.md's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "fuzz" / "gguf_fuzz.py"
CORPUS = ROOT / "tests" / "data" / "gguf_regressions"
sys.path.insert(0, str(ROOT / "fuzz"))


def _run(tmp_path: Path, *args: str) -> dict:
    summary = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, str(FUZZ), *args, "--out", str(tmp_path / "findings"),
                           "--summary", str(summary)], capture_output=True, text=True, timeout=900)
    assert summary.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(summary.read_text())


def test_regression_corpus_is_rejected_cleanly(tmp_path):
    files = sorted(CORPUS.glob("*.gguf"))
    assert len(files) >= 15
    s = _run(tmp_path, "--replay", str(CORPUS))
    assert s["findings"] == []
    assert s["counts"]["rejected"] == len(files)


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.gguf")))
def test_regression_file_message(name):
    """Every regression file raises LoadError naming what is wrong (in-process: the worker run
    above has shown none of them crashes)."""
    from make_regressions import EXPECTED
    from sambay.engine import LoadError, Model

    with pytest.raises(LoadError) as info:
        Model(CORPUS / name, device="cpu")
    assert EXPECTED[name] in str(info.value)


def test_regression_corpus_is_reproducible(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "fuzz" / "make_regressions.py"), str(tmp_path)], check=True,
                   capture_output=True)
    for p in CORPUS.glob("*.gguf"):
        assert (tmp_path / p.name).read_bytes() == p.read_bytes(), p.name


def test_quick_fuzz_slice(tmp_path):
    s = _run(tmp_path, "--inputs", "300", "--seed", "8", "--timeout", "60",
             "--seeds-dir", str(tmp_path / "seeds"))
    assert s["counts"]["inputs"] == 300
    assert s["findings"] == [], s["findings"]
    # the slice exercises both outcomes
    assert s["counts"]["loaded"] > 10 and s["counts"]["rejected"] > 100


def test_mutator_round_trips_the_seed(tmp_path):
    import gguf_fuzz

    seeds = tmp_path / "seeds"
    subprocess.run([sys.executable, str(FUZZ), "--make-seeds", str(seeds)], check=True, capture_output=True)
    for p in sorted(seeds.glob("tiny-*.gguf")):
        data = p.read_bytes()
        assert gguf_fuzz.serialize(gguf_fuzz.parse(data))[0] == data
