"""``python -m sambay.convert HF_DIR OUT.gguf [--outtype ...]``: the same as ``sambay convert``."""

from __future__ import annotations

import sys

from sambay.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
