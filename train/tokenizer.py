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

from sambay.convert.tiny import SPECIAL_TOKENS

_DIGITS = re.compile(r"[0-9]")
_SPECIALS = re.compile("|".join(re.escape(t) for t, _, _ in SPECIAL_TOKENS))


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A ``tokenizers.Tokenizer`` with at most ``vocab_size`` ids (trained merges + the 12
    special tokens). Deterministic for the same texts."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    n_trained = vocab_size - len(SPECIAL_TOKENS)
    if n_trained < 256 + 16:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_trained,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    # special tokens and digits never take part in merges
    clean = (_DIGITS.sub("", _SPECIALS.sub(" ", t)) for t in texts)
    tok.train_from_iterator(clean, trainer=trainer)
    for content, special, rstrip in SPECIAL_TOKENS:
        added = AddedToken(content, special=special, rstrip=rstrip, lstrip=False, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} ids > vocab_size {vocab_size}")
    return tok
