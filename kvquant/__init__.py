"""kvquant: quantize the queries and keys of a Hugging Face causal LM so that attention's
``Q·Kᵀ`` runs on quantized entries, with codebooks from the optimal point density for products.

    from kvquant.calibrate import CalibrationConfig, calibrate
    codebooks = calibrate(model, windows, CalibrationConfig())
    kvquant.wrap(model, codebooks)      # attention now uses quantized q and k
    kvquant.unwrap(model)               # back to the original model
"""

__version__ = "0.1.0"

from kvquant.cache import KVQuantCache, make_cache, query_quantizer  # noqa: E402
from kvquant.codebooks import CodebookConfig, Codebooks  # noqa: E402
from kvquant.compat import cache_kwargs  # noqa: E402
from kvquant.wrap import UnsupportedModelError, unwrap, wrap, wrapped  # noqa: E402

__all__ = [
    "CodebookConfig", "Codebooks", "KVQuantCache", "UnsupportedModelError", "cache_kwargs", "make_cache", "query_quantizer",
    "unwrap", "wrap", "wrapped", "__version__",
]
