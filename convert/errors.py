"""The converter's one exception type: bad input, with a one-line reason."""

from __future__ import annotations


class ConvertError(Exception):
    """The checkpoint folder (or the output path) cannot be converted.

    The message is one line that names the problem (file, key, tensor, expected vs found);
    ``sambay convert`` prints it and exits with status 1. No output file is left behind.
    """
