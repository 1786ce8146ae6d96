"""What the installed engine can run on."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ._version import __version__

THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# what each transparent-huge-page mode means for sambay (csrc/hugepages.h: on Linux the weights
# sambay copies out of the file and the caches ask for huge pages)
_THP_MEANING = {
    "always": "every process gets them",
    "madvise": "sambay asks for them for the weights it copies and its caches",
    "never": "off: sambay's request has no effect",
}


def thp_mode(path: Path = THP_ENABLED) -> Optional[str]:
    """The system's transparent-huge-page mode (the bracketed word of ``path``), or None where
    there is none to read (not Linux, or no /sys)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def system_info() -> dict[str, Any]:
    """Describe the installed sambay and the ggml it runs on.

    Returns:
        A dict with ``sambay_version``, ``ggml_version``, ``ggml_commit``, ``cpu_features``
        (the names of the features ggml's CPU backend reports as present, e.g. ``AVX2``,
        ``NEON``), ``backends`` (each with the raw feature dict its registry reports) and
        ``devices`` (name, description, type, memory), ``huge_pages`` (the system's
        transparent-huge-page mode: ``always``, ``madvise``, ``never``, or None where there is
        none).
    """
    from ._native import _core

    info = dict(_core.system_info())
    cpu_features: list[str] = []
    for backend in info["backends"]:
        if backend["name"].upper() == "CPU":
            cpu_features = [k for k, v in backend["features"].items() if v not in ("", "0")]
    return {"sambay_version": __version__, **info, "cpu_features": cpu_features, "huge_pages": thp_mode()}


def format_system_info(info: dict[str, Any]) -> str:
    """Render :func:`system_info` as the text ``sambay system-info`` prints."""
    lines = [
        f"sambay {info['sambay_version']}",
        f"ggml {info['ggml_version']} (commit {info['ggml_commit']})",
        "CPU features: " + (" ".join(info["cpu_features"]) or "(none reported)"),
        "backends: " + ", ".join(b["name"] for b in info["backends"]),
        "devices:",
    ]
    for dev in info["devices"]:
        mem = ""
        if dev["memory_total"]:
            mem = f", {dev['memory_free'] / 2**30:.1f}/{dev['memory_total'] / 2**30:.1f} GiB free"
        lines.append(f"  {dev['name']} [{dev['type']}] {dev['description']}{mem}")
    mode = info.get("huge_pages")
    if mode:
        lines.append(f"transparent huge pages: {mode}" + (f" ({_THP_MEANING[mode]})" if mode in _THP_MEANING else ""))
    return "\n".join(lines)
