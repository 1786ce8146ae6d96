"""Read a GGUF file's metadata (key -> value) in Python, without loading tensors."""

from __future__ import annotations

import os
from typing import Any, Callable, Union


class GGUFMetadataError(ValueError):
    """The file is missing or is not a readable GGUF file."""


def check_model_file(path: str, error: Callable[[str], Exception]) -> None:
    """Raises ``error`` unless ``path`` is an existing file, saying which case it is."""
    if os.path.isdir(path):
        raise error(f"{path}: is a folder; give the path of a .gguf file")
    if not os.path.isfile(path):
        raise error(f"model file not found: {path}")


def read_metadata(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its value (str, int, float, bool or list).

    Raises:
        GGUFMetadataError: missing file, or not a GGUF file.
    """
    import gguf
    from gguf import GGUFValueType

    path = os.fspath(path)
    check_model_file(path, GGUFMetadataError)
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as err:  # gguf-py raises ValueError / struct errors / IndexError
        raise GGUFMetadataError(f"not a valid GGUF file: {path} ({err})") from err

    def scalar(vtype: GGUFValueType, part: Any) -> Any:
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        value = part[0].item()
        return bool(value) if vtype == GGUFValueType.BOOL else value

    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the header's own fields
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = field.types[-1] if len(field.types) > 1 else GGUFValueType.UINT8
            out[key] = [scalar(sub, field.parts[i]) for i in field.data]
        else:
            out[key] = scalar(vtype, field.parts[field.data[0]])
    return out
