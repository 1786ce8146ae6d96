"""What the installed engine can run on."""

from __future__ import annotations

from typing import Any

from ._version import __version__


def system_info() -> dict[str, Any]:
    """Describe the installed sambay and the ggml it runs on.

    Returns:
        A dict with ``sambay_version``, ``ggml_version``, ``ggml_commit``, ``cpu_features``
        (the names of the features ggml's CPU backend reports as present, e.g. ``AVX2``,
        ``NEON``), ``backends`` (each with the raw feature dict its registry reports) and
        ``devices`` (name, description, type, memory).
    """
    from ._native import _core

    info = dict(_core.system_info())
    cpu_features: list[str] = []
    for backend in info["backends"]:
        if backend["name"].upper() == "CPU":
            cpu_features = [k for k, v in backend["features"].items() if v not in ("", "0")]
    return {"sambay_version": __version__, **info, "cpu_features": cpu_features}


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
    return "\n".join(lines)
