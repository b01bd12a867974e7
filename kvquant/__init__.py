"""kvquant: quantize the queries, keys and values of a Hugging Face causal LM so that attention's
``Q·Kᵀ`` runs on quantized entries, with codebooks from the optimal point density for products.

    import kvquant
    books = kvquant.calibrate(model, windows, kvquant.CalibrationConfig())
    kvquant.wrap(model, books)          # attention now uses quantized q and k
    kvquant.unwrap(model)               # back to the original model
    cache = kvquant.make_cache(model, books)   # or: a quantized KV cache for generate()

Layers, each importing only the ones above it in this list:

- ``kvquant.core``: the math — densities, scalar codebooks, pair statistics, group scales, bit
  packing and allocation, the quantizer; numpy/torch only, no transformers.
- ``kvquant.io``: files and assets — atomic writes, model fingerprints, the offline model and text.
- ``kvquant.codebooks``: per-layer, per-head codebooks built from statistics, and their file format.
- ``kvquant.kernels``: attention read from the cache's codes (C on the CPU, Triton on CUDA).
- ``kvquant.hf``: the transformers adapter — the attention function, ``wrap``, calibration.
- ``kvquant.cache``: the quantized KV cache for ``generate()``.
- ``kvquant.evaluation``: perplexity, generation mode, KL divergence, passkey, baselines, lm-eval.
- ``kvquant.cli``: the ``kvquant`` command.
"""

__version__ = "0.1.0"

from kvquant.cache import KVQuantCache, make_cache, query_quantizer  # noqa: E402
from kvquant.codebooks import CodebookConfig, Codebooks  # noqa: E402
from kvquant.hf.calibrate import CalibrationConfig, calibrate  # noqa: E402
from kvquant.hf.compat import cache_kwargs  # noqa: E402
from kvquant.hf.wrap import UnsupportedModelError, unwrap, wrap, wrapped  # noqa: E402

__all__ = [
    "CalibrationConfig", "CodebookConfig", "Codebooks", "KVQuantCache", "UnsupportedModelError", "cache_kwargs",
    "calibrate", "make_cache", "query_quantizer", "unwrap", "wrap", "wrapped", "__version__",
]
