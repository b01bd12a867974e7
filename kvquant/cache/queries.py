"""Queries quantized beside the cache: a :func:`kvquant.wrap` quantizer for the query side only."""

from __future__ import annotations

from dataclasses import replace

import torch

from kvquant.codebooks import Codebooks
from kvquant.hf.wrap import attention_modules


class QueryQuantizer:
    """A quantizer for :func:`kvquant.wrap` that quantizes queries only (``sides = ("q",)``) and
    passes keys through: use it beside a :class:`KVQuantCache`, which already holds quantized keys.

    Only causal query codebooks are accepted — a query is quantized from its own token and static
    calibrated tables (``norm`` ``head``/``channel``/``channel-token``), so a decoding step and a prefill give it
    the same codes; group-normalised query books (their range spans up to G − 1 later queries)
    are refused: :meth:`Codebooks.causal_queries` builds static per-channel ones from the same
    statistics. Pre-RoPE books get the queries with the rotation undone (the attention function
    derotates queries only). Queries at positions below the codebooks' ``sink`` stay exact: the
    positions are the ``position_ids`` the attention module was called with (stashed by
    :func:`kvquant.wrap`'s pre-hook), so a decoding step's single query is not taken for a sink.
    """

    sides = ("q",)

    def __init__(self, codebooks: Codebooks, model: torch.nn.Module):
        if codebooks.q.group:
            raise ValueError(
                "these query codebooks normalise over groups of tokens, which a decoding step does not have "
                "(the group's range spans later queries): use codebooks.causal_queries() for static tables"
            )
        self.codebooks, self.rope, self.sink = codebooks, codebooks.config.rope, codebooks.q.sink
        self._modules = {m.layer_idx: m for m in attention_modules(model)}
        self._no_sink = replace(codebooks.q, sink=0)

    def __call__(self, x: torch.Tensor, layer: int, side: str) -> torch.Tensor:
        if side != "q":
            return x
        out = self._no_sink.apply(x, layer)
        if not self.sink:
            return out
        pos = getattr(self._modules[layer], "kvquant_positions", None)
        if pos is None or pos.shape[-1] != x.shape[2]:
            raise RuntimeError(f"layer {layer}: no position_ids for the {x.shape[2]} queries (is the model wrapped?)")
        exact = (pos < self.sink).expand(x.shape[0], -1)[:, None, :, None].to(x.device)
        return torch.where(exact, x, out)

    def effective_bits(self, head_dim: int | None = None, *args, **kwargs) -> float:
        """Bits per query entry: codes, and a ``channel-token`` scale (16 / head_dim; static tables
        add nothing per entry; sinks not counted)."""
        token = 16 / (head_dim or self.codebooks.fingerprint.head_dim) if self.codebooks.q.token_scale else 0.0
        return float(self.codebooks.q.mean_bits) + token


def query_quantizer(codebooks: Codebooks, model: torch.nn.Module) -> QueryQuantizer:
    """:class:`QueryQuantizer` of ``codebooks``: ``kvquant.wrap(model, query_quantizer(books, model))``."""
    return QueryQuantizer(codebooks, model)
