"""The converter's exception type (bad input, with a one-line reason) and its warning type."""

from __future__ import annotations


class ConvertError(Exception):
    """The checkpoint folder (or the output path) cannot be converted.

    The message is one line that names the problem (file, key, tensor, expected vs found);
    ``sambay convert`` prints it and exits with status 1. No output file is left behind.
    """


class ConvertWarning(UserWarning):
    """The checkpoint converts, but the result is suspect: NaN or Inf weights, or values the
    output type cannot hold (F16 beyond +-65504). ``convert(strict=True)`` and ``sambay convert
    --strict`` raise ConvertError instead."""
