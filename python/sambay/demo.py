"""The built-in demo model: a 1.4 M-parameter SambaY trained on column arithmetic.

It has the real Phi-4-mini-flash-reasoning layer schedule (8 layers: Mamba, sliding-window
differential attention, the memory Mamba, the one full-attention layer, a GMU and a
cross-attention layer over the shared KV cache), the real special tokens and chat format, and
answers multi-digit addition, subtraction and multiplication questions with a short worked trace,
also when the operands were given far (several sliding windows) before the question::

    <|user|>What is 347 + 582?<|end|><|assistant|><think>Ones: 7+2+0=9, carry 0. ...
    </think>The answer is 929.<|end|>

How it was trained: train/README.md in the source tree.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_FILE = "demo-model.gguf"


def demo_model_path() -> str:
    """Path of the demo model's GGUF file shipped inside the package.

    Raises:
        FileNotFoundError: the package was installed without its data files.
    """
    path = Path(__file__).resolve().parent / "data" / DEMO_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the built-in demo model is missing: {path}")
    return str(path)


__all__ = ["DEMO_MODEL_FILE", "demo_model_path"]
