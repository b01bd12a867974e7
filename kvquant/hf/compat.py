"""What moved between the transformers versions kvquant supports (``pyproject.toml``; CI tests the
oldest and the newest). One place, so the rest of the package reads as if there were one version.

- ``get_layer_types_and_kwargs`` returns one kwargs dict shared by all layers in 5.17 and one
  dict per layer in 5.23+ (per-layer configs; the versions between were not checked):
  :func:`cache_layer_types` gives ``[(layer_type, sliding_window or None), …]`` on both.
- ``DummyLayer`` (a cache slot for layers without attention or with a shared KV cache) exists
  from 5.23; before it, no config produces a ``"dummy"`` layer type.
- ``generate``/``forward`` take the cache as ``cache=`` from 5.24 (``past_key_values=`` is
  deprecated there, removed in 5.40 for ``forward``): :func:`cache_kwargs`.
"""

from __future__ import annotations

import transformers
from packaging.version import Version
from transformers.cache_utils import get_layer_types_and_kwargs

try:  # transformers >= 5.23
    from transformers.cache_utils import DummyLayer
except ImportError:  # pragma: no cover - depends on the installed version
    DummyLayer = None

__all__ = ["DummyLayer", "TRANSFORMERS_VERSION", "WINDOWED_LAYER_TYPES", "cache_kwargs", "cache_layer_types"]

TRANSFORMERS_VERSION = Version(transformers.__version__)
#: Layer types whose cache keeps only the last ``sliding_window`` tokens.
WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention")
_CACHE_KWARG = "cache" if TRANSFORMERS_VERSION >= Version("5.24.0.dev0") else "past_key_values"


def cache_layer_types(config) -> list[tuple[str, int | None]]:
    """``(layer_type, sliding_window)`` for every decoder layer of the text ``config``, as
    transformers' own ``DynamicCache`` would build its layers (window ``None`` for full attention)."""
    types, kwargs = get_layer_types_and_kwargs(config)
    per_layer = kwargs if isinstance(kwargs, list) else [kwargs] * len(types)  # 5.17: one dict for all layers
    return [(kind, kw.get("sliding_window") if kind in WINDOWED_LAYER_TYPES else None)
            for kind, kw in zip(types, per_layer)]


def passed_cache(kwargs: dict):
    """The cache an attention module's forward was called with (``kwargs`` of a forward pre-hook), or
    None: ``cache`` (5.24+), ``past_key_values``, or GPT-NeoX's ``layer_past``."""
    for name in (_CACHE_KWARG, "past_key_values", "layer_past"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_kwargs(cache) -> dict:
    """Keyword arguments passing ``cache`` to ``model.generate``/``model(...)`` under the name the
    installed transformers expects: ``model.generate(ids, **cache_kwargs(cache))``."""
    return {_CACHE_KWARG: cache}
