"""Positions and rotary tables for a cache of pre-RoPE keys (stored before the rotation, rotated
at their positions when read)."""

from __future__ import annotations

from typing import Callable

import torch


class LayerRope:
    """Where a layer with pre-RoPE keys gets positions and rotary tables: the ``position_ids`` its
    attention module was called with in the current forward (stashed by kvquant's forward
    pre-hook, which :func:`kvquant.wrap` installs) and the model's own rotary embedding at any
    positions (:func:`kvquant.hf.wrap.rotary_tables`)."""

    def __init__(self, module: torch.nn.Module, tables: Callable, layer: int, shared: dict | None = None):
        self.module, self._tables, self.layer = module, tables, layer
        self._shared = {} if shared is None else shared  # one per cache: tables its layers share

    def __deepcopy__(self, memo: dict) -> "LayerRope":
        # a copied cache (e.g. copy.deepcopy of a prefilled prompt cache) reads the same model's
        # modules and rotary embedding, not copies of them; the shared tables are never written
        return LayerRope(self.module, self._tables, self.layer, self._shared)

    def delta_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's ``a·cos(θδ)``, ``a·sin(θδ)`` for δ = 0 … n−1 as (r/2, n) float32, one copy per
        cache and rotary embedding (layers of the same rope share it)."""
        inv_freq, a = self.frequencies()
        key = (inv_freq.data_ptr(), a, n)
        if key not in self._shared:
            cos, sin = self.tables(torch.arange(n).unsqueeze(0))  # (1, n, r)
            rh = cos.shape[-1] // 2
            self._shared[key] = (cos[0, :, :rh].T.contiguous(), sin[0, :, :rh].T.contiguous())
        return self._shared[key]

    def latest(self, name: str, key: tuple, make: Callable[[], tuple]) -> tuple:
        """``make()``, shared by the cache's layers of the same rotary embedding that ask for
        ``name`` with the same ``key``; only the newest key's value is kept (layers advance together,
        so an older one is not asked for again)."""
        inv_freq, a = self.frequencies()
        slot = (name, inv_freq.data_ptr(), a)
        held = self._shared.get(slot)
        if held is None or held[0] != key:
            held = self._shared[slot] = (key, make())
        return held[1]

    def positions(self, batch: int, n: int) -> torch.Tensor:
        """Position ids (B, 1, n) int32 of the ``n`` tokens this layer is being updated with."""
        pos = getattr(self.module, "kvquant_positions", None)
        if pos is None or pos.shape[-1] != n:
            raise RuntimeError(
                f"layer {self.layer}: the attention module was not called with the position_ids of the {n} new tokens "
                "(was the model unwrapped after make_cache?); a cache of pre-RoPE keys needs them to rotate keys back"
            )
        return pos.expand(batch, n).to(torch.int32).unsqueeze(1)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` (B, n, r) float32 at ``positions`` (B, n)."""
        return self._tables(self.layer, positions.long())

    def frequencies(self) -> tuple[torch.Tensor, float]:
        """``(inv_freq (r/2,), attention_scaling)`` of this layer's rotary embedding."""
        return self._tables.frequencies(self.layer)
