"""Rows of transformers' own quantized KV cache (``QuantizedCache``) beside kvquant's: the
backends, the bits each takes, and a factory of fresh caches (``--baselines quanto@4``)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, QuantizedCache

__all__ = ["LIBRARY_BACKENDS", "LIBRARY_BITS", "LIBRARY_RESIDUAL", "LibraryCache"]

#: transformers ``QuantizedCache`` backends a row may name, with the module each needs.
LIBRARY_BACKENDS = {"quanto": "optimum.quanto", "hqq": "hqq"}
#: Recent tokens transformers' ``QuantizedCache`` holds exact (its ``residual_length`` default).
LIBRARY_RESIDUAL = 128
#: The bits each backend takes (transformers' ``QuantoQuantizedLayer`` / ``HQQQuantizedLayer`` checks).
LIBRARY_BITS = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8)}


@dataclass(frozen=True)
class LibraryCache:
    """A row of transformers' own quantized KV cache: ``QuantizedCache(backend, config, nbits)``
    with the library's defaults (quanto: INT per token and head over groups of 64 channels,
    residual_length 128 exact tokens, then the whole cache re-quantized). ``--baselines
    quanto@4`` in generation mode; needs the ``compare`` extra."""

    backend: str
    nbits: int

    def __post_init__(self) -> None:
        if self.backend not in LIBRARY_BACKENDS:
            raise ValueError(f"unknown QuantizedCache backend {self.backend!r}; use {', '.join(LIBRARY_BACKENDS)}")
        allowed = LIBRARY_BITS[self.backend]
        if self.nbits not in allowed:  # refused here, before any row runs (transformers refuses at the first update)
            raise ValueError(f"row {self.backend}@{self.nbits:g}: transformers' {self.backend} cache takes "
                             f"{', '.join(map(str, allowed))} bits")
        if importlib.util.find_spec(LIBRARY_BACKENDS[self.backend].split(".")[0]) is None or (
                importlib.util.find_spec(LIBRARY_BACKENDS[self.backend]) is None):
            raise ValueError(f"row {self.backend}@{self.nbits} needs {LIBRARY_BACKENDS[self.backend]}: "
                             "pip install 'kvquant-density[compare]'")

    def new(self, model: torch.nn.Module) -> Cache:
        return QuantizedCache(self.backend, model.config, nbits=self.nbits)
