"""The demo model's byte-level BPE, trained with ``tokenizers`` on the synthetic data.

Like the real Phi-4-mini tokenizer it is a byte-level BPE with the real special tokens
(``SPECIAL_TOKENS`` of ``sambay.convert.tiny``, appended after the trained vocabulary, with the
real ``special``/``rstrip`` flags). Digits are removed from the training text, so no merge ever
contains a digit: every digit is a token of its own, whatever the pre-tokenizer, which keeps
column arithmetic learnable for a small model.
"""

from __future__ import annotations

import re
from typing import Iterable

from sambay.convert.tiny import SPECIAL_TOKENS, train_byte_level_bpe

_DIGITS = re.compile(r"[0-9]")
_SPECIALS = re.compile("|".join(re.escape(t) for t, _, _ in SPECIAL_TOKENS))


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A ``tokenizers.Tokenizer`` with at most ``vocab_size`` ids (trained merges + the 12
    special tokens). Deterministic for the same texts."""
    # special tokens and digits never take part in merges
    clean = (_DIGITS.sub("", _SPECIALS.sub(" ", t)) for t in texts)
    return train_byte_level_bpe(clean, vocab_size - len(SPECIAL_TOKENS), vocab_size)
