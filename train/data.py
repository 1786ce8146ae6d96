"""Seeded synthetic math-reasoning data for the demo model, in Phi-4-mini's chat format.

Every example is one user turn and one assistant turn::

    <|user|>What is 347 + 582?<|end|><|assistant|><think>Ones: 7+2+0=9, carry 0. Tens:
    4+8+0=12, carry 1. Hundreds: 3+5+1=9, carry 0.</think>The answer is 929.<|end|>

(one line in the data). The worked trace goes column by column from the ones digit, the way
the problem is done by hand:

* addition ``a + b`` (2-3 digit operands): ``Tens: 4+8+0=12, carry 1.`` -- the two digits,
  the carry in, the column sum, the carry out;
* subtraction ``a - b`` (2-3 digits, a >= b): ``Tens: 14-8-1=5, borrow 1.`` -- the top digit
  (plus 10 when the column has to borrow), the bottom digit, the borrow in, the result;
* multiplication ``a * b`` (2-3 digit a, one-digit b): ``Tens: 4*6+4=28, carry 2.``

Long-range variant: the operands are stated first, then filler text several times longer than
the sliding window, then the question names them only by letter::

    <|user|>Remember: a = 347 and b = 582. the small river walks ... near a green door.
    Now, what is a + b?<|end|><|assistant|><think>Ones: 7+2+0=9, ...

so the assistant can only copy the digits through the full-attention layer, the shared KV cache
of the cross-decoder or the Mamba state, never through the sliding window.

Held-out problems are disjoint from the training problems: a problem (op, a, b) is held out when
a hash of it falls in a fixed 10% bucket, and the training stream never yields one.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterator, Optional

OPS = ("+", "-", "*")
COLUMNS = ("Ones", "Tens", "Hundreds", "Thousands")

_QUESTIONS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}.")
_LONG_INTRO = ("Remember: a = {a} and b = {b}.", "Note that a = {a} and b = {b}.")
_LONG_QUESTIONS = ("Now, what is a {op} b?", "Now compute a {op} b.")

# filler vocabulary: digit-free, lower-case, no ":" or "=" (those only occur in the problems)
_DET = ("the", "a", "one", "every", "some", "that")
_ADJ = ("small", "green", "quiet", "old", "bright", "cold", "tall", "slow", "warm", "dark",
        "happy", "red", "round", "soft", "blue", "wild")
_NOUN = ("river", "door", "bird", "house", "tree", "stone", "cat", "road", "cloud", "lamp",
         "boat", "hill", "book", "garden", "window", "horse", "song", "field", "ship", "star")
_VERB = ("walks", "sees", "finds", "holds", "likes", "moves", "keeps", "meets", "opens",
         "follows", "hears", "passes")
_PREP = ("near", "under", "over", "behind", "beside", "past", "toward", "after")


@dataclass(frozen=True)
class Problem:
    op: str  # "+", "-" or "*"
    a: int
    b: int
    long_range: bool
    prompt: str  # chat-formatted: "<|user|>...<|end|><|assistant|>"
    completion: str  # "<think>...</think>The answer is N.<|end|>"
    answer: int

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def solve(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def worked_trace(op: str, a: int, b: int) -> str:
    """The column-by-column trace (without the <think> tags)."""
    da = [int(c) for c in reversed(str(a))]
    db = [int(c) for c in reversed(str(b))]
    steps = []
    if op == "*":
        if b > 9:
            raise ValueError("multiplication takes a one-digit second operand")
        carry = 0
        for k, x in enumerate(da):
            t = x * b + carry
            steps.append(f"{COLUMNS[k]}: {x}*{b}+{carry}={t}, carry {t // 10}.")
            carry = t // 10
        return " ".join(steps)
    n = max(len(da), len(db))
    da += [0] * (n - len(da))
    db += [0] * (n - len(db))
    carry = 0
    for k in range(n):
        if op == "+":
            t = da[k] + db[k] + carry
            steps.append(f"{COLUMNS[k]}: {da[k]}+{db[k]}+{carry}={t}, carry {t // 10}.")
            carry = t // 10
        else:
            top = da[k]
            if top - db[k] - carry < 0:
                top += 10
            t = top - db[k] - carry
            new_borrow = 1 if top >= 10 else 0
            steps.append(f"{COLUMNS[k]}: {top}-{db[k]}-{carry}={t}, borrow {new_borrow}.")
            carry = new_borrow
    return " ".join(steps)


def is_held_out(op: str, a: int, b: int) -> bool:
    """The fixed 10% of problems reserved for evaluation (never in the training stream)."""
    h = hashlib.sha256(f"{op}|{a}|{b}".encode()).digest()
    return h[0] % 10 == 0


def filler(rng: random.Random, n_words: int) -> str:
    """Digit-free filler sentences of at least ``n_words`` words."""
    words: list[str] = []
    while len(words) < n_words:
        s = [rng.choice(_DET), rng.choice(_ADJ), rng.choice(_NOUN), rng.choice(_VERB),
             rng.choice(_DET), rng.choice(_NOUN)]
        if rng.random() < 0.5:
            s += [rng.choice(_PREP), rng.choice(_DET), rng.choice(_ADJ), rng.choice(_NOUN)]
        words += s
        words[-1] += "."
    return " ".join(words)


def _operands(rng: random.Random, op: str) -> tuple[int, int]:
    def num(lo_digits: int, hi_digits: int) -> int:
        nd = rng.randint(lo_digits, hi_digits)
        return rng.randint(10 ** (nd - 1), 10**nd - 1)

    if op == "*":
        return num(2, 3), rng.randint(2, 9)
    a, b = num(2, 3), num(2, 3)
    if op == "-" and a < b:
        a, b = b, a
    return a, b


def make_problem(
    rng: random.Random,
    *,
    op: Optional[str] = None,
    long_range: bool = False,
    filler_words: tuple[int, int] = (48, 80),
    held_out: Optional[bool] = None,
) -> Problem:
    """One random problem. ``held_out``: True = only held-out problems, False = never one,
    None = either."""
    op = op or rng.choice(OPS)
    while True:
        a, b = _operands(rng, op)
        if held_out is None or is_held_out(op, a, b) == held_out:
            break
    if long_range:
        user = " ".join([
            rng.choice(_LONG_INTRO).format(a=a, b=b),
            filler(rng, rng.randint(*filler_words)),
            rng.choice(_LONG_QUESTIONS).format(op=op),
        ])
    else:
        user = rng.choice(_QUESTIONS).format(a=a, op=op, b=b)
    ans = solve(op, a, b)
    prompt = f"<|user|>{user}<|end|><|assistant|>"
    completion = f"<think>{worked_trace(op, a, b)}</think>The answer is {ans}.<|end|>"
    return Problem(op, a, b, long_range, prompt, completion, ans)


def training_stream(seed: int, long_fraction: float = 0.35) -> Iterator[Problem]:
    """An endless, seeded stream of training problems (no held-out problem ever)."""
    rng = random.Random(seed)
    while True:
        yield make_problem(rng, long_range=rng.random() < long_fraction, held_out=False)


def held_out_set(n_short: int, n_long: int, seed: int = 12345) -> list[Problem]:
    """A fixed evaluation set: ``n_short`` short then ``n_long`` long-range problems, the
    three operations in turn."""
    rng = random.Random(seed)
    out = [make_problem(rng, op=OPS[k % 3], held_out=True) for k in range(n_short)]
    out += [make_problem(rng, op=OPS[k % 3], long_range=True, held_out=True)
            for k in range(n_long)]
    return out


def parse_answer(completion: str) -> Optional[int]:
    """The integer after "The answer is", or None."""
    key = "The answer is "
    i = completion.rfind(key)
    if i < 0:
        return None
    s = completion[i + len(key):]
    digits = ""
    for ch in s:
        if ch.isdigit() or (ch == "-" and not digits):
            digits += ch
        else:
            break
    try:
        return int(digits)
    except ValueError:
        return None


def tokenizer_corpus(seed: int = 7, n: int = 3000) -> list[str]:
    """Texts to train the BPE on (problems of every kind, both variants)."""
    rng = random.Random(seed)
    return [make_problem(rng, long_range=rng.random() < 0.5).text for _ in range(n)]


if __name__ == "__main__":
    rng = random.Random(0)
    for lr in (False, True):
        for op in OPS:
            print(make_problem(rng, op=op, long_range=lr).text, "\n")
