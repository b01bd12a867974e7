"""A model's codebooks: one per (layer, query head) and per (layer, KV head), saved with their
statistics, configuration and model fingerprint in one safetensors file.

Normalisation (static, from calibration), per head or per channel:
``x̃ = (x − offset) / scale`` with offset = mean and scale = σ of x over the multiplying pairs;
the codebook quantizes x̃ (its centers are in σ units) and ``x̂ = offset + scale · center``.
Static scales and tables are per model, not per token, so the effective bits per entry are
exactly the codebook bits. ``channel-token`` adds one scale per token and head on top of the
per-channel normalisation: ``r = max_j |x̃_j| / c_max`` (stored in fp16, +16/D bits per entry;
``c_max`` the codebook's outermost center), and the codebook quantizes ``x̃ / r`` — no entry of
any token is clipped, and each token is quantized from itself alone (a causal rule for queries,
:meth:`Codebooks.causal_queries`).

Codebooks come from the Gaussian pair model fitted to the calibration statistics:
query head h uses ``(ρ_h, μ_Q/σ_Q, μ_K/σ_K)``; a KV head shared by g query heads uses the
pooled ``ρ_eff² = Σ σ_Q,g² ρ_g² / Σ σ_Q,g²`` (docs/theory.md §4, GQA).
"""

from kvquant.codebooks.allocation import allocate_levels
from kvquant.codebooks.books import Codebooks
from kvquant.codebooks.config import FORMAT, FORMAT_VERSION, NORMS, CodebookConfig, ConfigError, Norm
from kvquant.codebooks.fileformat import CALIBRATION_RECORD, file_problem
from kvquant.codebooks.sides import SideBooks

__all__ = ["CALIBRATION_RECORD", "FORMAT", "FORMAT_VERSION", "NORMS", "CodebookConfig", "Codebooks", "ConfigError", "Norm", "SideBooks",
           "allocate_levels", "file_problem"]
