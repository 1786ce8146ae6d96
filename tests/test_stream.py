"""Stop strings never leak a partial match into streamed text."""

from __future__ import annotations

import random

from sambay._stream import StopStringFilter, find_stop, partial_stop_len


def test_find_and_partial():
    assert find_stop("abc<|end|>def", ["<|end|>", "de"]) == 3
    assert find_stop("abc", ["x"]) is None
    assert partial_stop_len("hello <|e", ["<|end|>"]) == 3
    assert partial_stop_len("hello", ["<|end|>"]) == 0
    assert partial_stop_len("ab", ["abc", "b"]) == 2


def test_filter_never_shows_a_stop_prefix_that_completes():
    text = "The answer is 42.\n\nQuestion: what"
    stops = ["\n\nQuestion:"]
    expected = "The answer is 42."
    rng = random.Random(0)
    for _ in range(200):  # random splits into pieces, like tokens
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 10)))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        f = StopStringFilter(stops)
        shown = ""
        for p in pieces:
            shown += f.feed(p)
            assert not any(shown.endswith(s[:k]) and k > 0 and not expected.endswith(s[:k])
                           for s in stops for k in range(1, len(s)))
        shown += f.flush()
        assert shown == expected
        assert f.stopped


def test_filter_releases_held_text_when_no_stop_comes():
    f = StopStringFilter(["<|end|>"])
    assert f.feed("a <|e") == "a "
    assert f.feed("x") == "<|ex"
    assert f.feed("<|") == ""
    assert f.flush() == "<|"
    assert not f.stopped
