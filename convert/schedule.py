"""The SambaY layer schedule: the ONLY place it is computed (spec §2).

For N layers with ``mb_per_layer == 2``:

    i <  N/2,   even -> mamba        i <  N/2,   odd -> attn_swa
    i == N/2         -> mamba (its SSM read-out is the GMU memory)
    i == N/2+1       -> attn_full (its K/V are shared by every cross layer)
    i >= N/2+2, even -> gmu          i >= N/2+2, odd -> attn_cross

The engine never recomputes this: the converter stores it as ``phi4flash.layer_types``.
The kinds themselves and their stored values are the engine's (``sambay.engine.LAYER_KINDS``).
"""

from __future__ import annotations

import enum
from typing import Optional, Sequence

from sambay.engine import LAYER_KINDS


class LayerKind(enum.IntEnum):
    """Per-layer mixer kind; the values are what ``phi4flash.layer_types`` stores, taken from
    the engine (a kind the engine does not know fails here, at import)."""

    MAMBA = LAYER_KINDS.index("mamba")
    ATTN_SWA = LAYER_KINDS.index("attn_swa")
    ATTN_FULL = LAYER_KINDS.index("attn_full")
    GMU = LAYER_KINDS.index("gmu")
    ATTN_CROSS = LAYER_KINDS.index("attn_cross")

    @property
    def label(self) -> str:
        """The engine's name of this kind (``"mamba"``, ``"attn_swa"``, ...)."""
        return LAYER_KINDS[self.value]


# every kind of the engine has a member here (the schedule below would otherwise miss it)
assert len(LayerKind) == len(LAYER_KINDS), (list(LayerKind), LAYER_KINDS)


class ScheduleError(ValueError):
    """The config describes a layer schedule SambaY cannot have."""


def memory_layer(n_layer: int) -> int:
    """Index of the Mamba layer whose SSM read-out feeds the GMUs (N/2)."""
    return n_layer // 2


def kv_shared_layer(n_layer: int) -> int:
    """Index of the full-attention layer whose K/V every cross layer reads (N/2+1)."""
    return n_layer // 2 + 1


def layer_kinds(
    n_layer: int,
    mb_per_layer: int = 2,
    sliding_window: Optional[Sequence[Optional[int]]] = None,
    layer_types: Optional[Sequence[str]] = None,
) -> list[LayerKind]:
    """The kind of every layer.

    Args:
        n_layer: ``num_hidden_layers``; must be a multiple of 4.
        mb_per_layer: ``mb_per_layer``; only 2 exists in practice (the reference caches
            hard-code ``i % 2``).
        sliding_window: the per-layer window list of the original config revision, if the
            config has one: it must agree with the rule (a window on the SWA layers, None on
            every other self-decoder layer).
        layer_types: the ``layer_types`` list of newer config revisions, if present
            (``"sliding_attention"`` marks the SWA layers); it must agree with the rule.

    Raises:
        ScheduleError: on a layer count or a per-layer list that the rule cannot produce.
    """
    if n_layer <= 0 or n_layer % 4 != 0:
        raise ScheduleError(f"num_hidden_layers must be a positive multiple of 4, got {n_layer}")
    if mb_per_layer != 2:
        raise ScheduleError(f"only mb_per_layer == 2 is supported, got {mb_per_layer}")
    half = n_layer // 2
    kinds: list[LayerKind] = []
    for i in range(n_layer):
        if i < half:
            kinds.append(LayerKind.MAMBA if i % mb_per_layer == 0 else LayerKind.ATTN_SWA)
        elif i == half:
            kinds.append(LayerKind.MAMBA)
        elif i == half + 1:
            kinds.append(LayerKind.ATTN_FULL)
        else:
            kinds.append(LayerKind.GMU if i % mb_per_layer == 0 else LayerKind.ATTN_CROSS)

    if sliding_window is not None:
        if len(sliding_window) != n_layer:
            raise ScheduleError(
                f"sliding_window list has {len(sliding_window)} entries for {n_layer} layers"
            )
        for i, (kind, w) in enumerate(zip(kinds, sliding_window)):
            if kind in (LayerKind.MAMBA, LayerKind.GMU):
                continue  # no attention: a window there means nothing
            if (w is not None) != (kind == LayerKind.ATTN_SWA):
                raise ScheduleError(
                    f"sliding_window[{i}] = {w!r} does not fit the SambaY schedule "
                    f"(layer {i} is {kind.name.lower()})"
                )
    if layer_types is not None:
        if len(layer_types) != n_layer:
            raise ScheduleError(f"layer_types has {len(layer_types)} entries for {n_layer} layers")
        for i, (kind, t) in enumerate(zip(kinds, layer_types)):
            if (t == "sliding_attention") != (kind == LayerKind.ATTN_SWA):
                raise ScheduleError(
                    f"layer_types[{i}] = {t!r} does not fit the SambaY schedule "
                    f"(layer {i} is {kind.name.lower()})"
                )
    return kinds
