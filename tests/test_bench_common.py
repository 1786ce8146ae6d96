"""bench/common.py's best_run: the fastest of repeated runs of one measurement, every run kept."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `bench`
from bench.common import best_run  # noqa: E402


def test_best_run_keeps_the_fastest_and_lists_every_run():
    runs = [{"tok_s": 3.0, "i": 0}, {"error": "timed out"}, {"tok_s": 5.0, "i": 2}, {"tok_s": 4.0, "i": 3}]
    r = best_run(runs, "tok_s")
    assert r["i"] == 2 and r["tok_s"] == 5.0
    assert r["runs"] == [3.0, None, 5.0, 4.0]


def test_best_run_of_one_run_is_that_run_and_errors_pass_through():
    assert best_run([{"tok_s": 1.0}], "tok_s") == {"tok_s": 1.0}
    assert best_run([{"error": "a"}, {"error": "b"}], "tok_s") == {"error": "b", "runs": [None, None]}
