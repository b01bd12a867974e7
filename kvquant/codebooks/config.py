"""What a set of codebooks is built with (:class:`CodebookConfig`: method, bits, normalisation,
rotary frame, allocation budget) and the bits per entry it costs, scales and exact tokens counted."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Literal

from kvquant.core import scalar as cb
from kvquant.core.groupnorm import SCALE_BITS, complete_tokens, outlier_count
from kvquant.core.rope import Rope

#: The codebook file format this code writes and reads (a file of another version is refused).
FORMAT = "kvquant-codebooks"
FORMAT_VERSION = 1
Norm = Literal["head", "channel", "channel-token", "channel-group"]
NORMS = ("head", "channel", "channel-token", "channel-group")


class ConfigError(ValueError):
    """A configuration refused. Its message names the fields it is about as `` `field` `` (the
    dataclass's own names, the one source of them): ``str(e)`` shows them plain, :meth:`naming`
    with the names a front end gives them (the CLI: ``--scale-bits`` for ``scale_bits``)."""

    _FIELD = re.compile(r"`(\w+)`")

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.naming(lambda field: field))

    def naming(self, name: Callable[[str], str]) -> str:
        """The message with every marked field ``f`` written as ``name(f)``."""
        return self._FIELD.sub(lambda m: name(m[1]), self.template)


@dataclass(frozen=True)
class CodebookConfig:
    """How codebooks are built from statistics."""

    method: cb.Method = "lambda"
    bits_q: int = 4
    bits_k: int = 4
    norm: Norm = "head"
    group: int = 128
    sink: int = 0
    outliers: float = 0.0  # channel-group only: fraction of each G×D block kept exact (dense-and-sparse)
    rope: Rope = "post"  # quantize q and k after the rotary embedding, or before it ("pre", kvquant.core.rope)
    # > 0: average code bits per entry over queries and keys, spread over (layer, head, channel, side)
    # by reverse water-filling (kvquant.core.allocate); each channel gets 2, 3, 4, 5, 8, … up to 2^bits_q
    # (queries) / 2^bits_k (keys) levels (at_effective_bits: the budget for exactly b bits in all)
    budget: float = 0.0
    # which sides the budget is spread over: "qk" (the simulated Q·Kᵀ) or "k" (a KV cache whose
    # queries stay exact: the budget is the keys' mean code bits; queries keep bits_q everywhere)
    budget_sides: str = "qk"
    scale_bits: int = 16  # channel-group: bits of each stored (mid, half) value, 16 (fp16) or 8 (groupnorm.code_scales)
    # bits of the values a KV cache of these codebooks stores (make_cache's default; 0: the keys' mean code bits)
    bits_v: int = 0
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.method not in cb.METHODS:
            raise ConfigError(f"`method` must be one of {', '.join(cb.METHODS)}; got {self.method!r}")
        for name in ("bits_q", "bits_k"):
            try:
                cb.levels_for_bits(getattr(self, name))
            except ValueError as e:
                raise ConfigError(f"`{name}`: {e}") from None
        if self.norm not in NORMS:
            raise ConfigError(f"`norm` must be one of {', '.join(NORMS)}; got {self.norm!r}")
        if self.group < 2:
            raise ConfigError(f"`group` (tokens per dynamic channel scale) must be >= 2, got {self.group}")
        if self.sink < 0:
            raise ConfigError(f"`sink` (first tokens kept exact) must be >= 0, got {self.sink}")
        if self.norm == "channel-group" and self.sink >= self.group:
            raise ConfigError(f"`sink` ({self.sink}) must be smaller than `group` ({self.group}) with `norm` "
                              "'channel-group': the exact sink tokens are kept inside the first group")
        if not (isinstance(self.outliers, (int, float)) and 0 <= self.outliers < 0.5):
            raise ConfigError(
                f"`outliers` (fraction of entries per head and group kept exact) must be in [0, 0.5), got {self.outliers!r}"
            )
        if self.rope not in ("post", "pre"):
            raise ConfigError(f"`rope` must be 'post' or 'pre' (quantize after or before the rotary embedding); "
                              f"got {self.rope!r}")
        if self.budget and not (isinstance(self.budget, (int, float)) and cb.MIN_BITS <= self.budget <= max(self.bits_q, self.bits_k)):
            raise ConfigError(
                f"`budget` (average bits per entry) must be in [{cb.MIN_BITS}, max(`bits_q`, `bits_k`) = "
                f"{max(self.bits_q, self.bits_k)}] — `bits_q`/`bits_k` are the most one head may get; got {self.budget!r}"
            )
        if self.budget and self.norm != "channel-group":
            raise ConfigError(
                f"`budget` (bit allocation) needs `norm` 'channel-group' (its error curves come from the calibration "
                f"histograms); got `norm` {self.norm!r}"
            )
        if not (isinstance(self.bits_v, int) and 0 <= self.bits_v <= cb.MAX_BITS):
            raise ConfigError(f"`bits_v` (bits of the cached values; 0 = the keys' mean) must be 0–{cb.MAX_BITS}, "
                              f"got {self.bits_v!r}")
        if self.budget_sides not in ("qk", "k"):
            raise ConfigError(f"`budget_sides` must be 'qk' (queries and keys) or 'k' (keys only); got {self.budget_sides!r}")
        if self.scale_bits not in SCALE_BITS:
            raise ConfigError(f"`scale_bits` (bits per stored group mid/half) must be one of {SCALE_BITS}, "
                              f"got {self.scale_bits!r}")
        if self.scale_bits != 16 and self.norm != "channel-group":
            raise ConfigError(f"`scale_bits` {self.scale_bits} needs `norm` 'channel-group' (static scales are per "
                              f"model); got {self.norm!r}")
        if self.outliers and self.norm != "channel-group":
            raise ConfigError(f"`outliers` > 0 needs `norm` 'channel-group' (they are found per group); got `norm` "
                              f"{self.norm!r}")

    @property
    def dynamic(self) -> bool:
        return self.norm == "channel-group"

    def effective_bits(self, code_bits: float, head_dim: int, seqlen: int | None = None) -> float:
        """Bits per entry held after ``seqlen`` tokens for ``code_bits`` bits of codes per entry
        (averaged over queries and keys), as the KV cache holds them. Static scales and tables are
        per model and add nothing per entry; ``channel-token`` adds an fp16 scale per token and head,
        16/D; ``channel-group`` adds a (mid, half) per channel per
        complete group, 2·scale_bits/G (32/G in fp16, 16/G in 8 bits), and the newest incomplete
        group (``seqlen mod G`` tokens) is held exact, 16 bits per entry instead of codes; the
        ``sink`` exact tokens cost 16 bits *on top of* their code slot (the layout keeps one).
        ``seqlen`` is required when sink > 0; without it a group mode counts whole groups only.

        Outliers (dense-and-sparse, ``outliers = p``): each (group × D) block keeps
        ``n = ⌈p·G·D⌉`` entries exact, each costing an fp16 value plus its position in the
        block, ``⌈log2(G·D)⌉`` bits (13 for 128 × 64), *on top of* the dense b-bit code (a packed
        dense layout keeps a code at every position). So, for the entries of complete groups,

            bits = code_bits + 2·scale_bits/G + (n / (G·D)) · (16 + ⌈log2(G·D)⌉)

        p = 0.5 % at G = 128, D = 64: n = 41, +0.145 bits."""
        bits = code_bits
        if self.norm == "channel-token":
            bits += 16 / head_dim
        if self.dynamic:
            bits += 2 * self.scale_bits / self.group
        if self.outliers:
            block = self.group * head_dim
            bits += outlier_count(self.outliers, block) / block * (16 + math.ceil(math.log2(block)))
        if self.dynamic and seqlen:
            tail = (seqlen - complete_tokens(seqlen, self.group)) / seqlen
            bits = bits * (1 - tail) + 16 * tail
        if self.sink:
            if not seqlen:
                raise ValueError("effective bits with exact sink tokens depend on the sequence length")
            bits += 16 * min(self.sink, seqlen) / seqlen
        return bits

    def code_bits(self, effective_bits: float, head_dim: int, seqlen: int | None = None) -> float:
        """Inverse of :meth:`effective_bits`: the code ``budget`` that makes ``effective_bits``."""
        at0, at1 = self.effective_bits(0.0, head_dim, seqlen), self.effective_bits(1.0, head_dim, seqlen)
        if at1 == at0:
            raise ConfigError(f"at `seqlen` {seqlen} no group of {self.group} tokens is complete, so every entry is "
                              "held exact and no code budget sets the effective bits: use a `seqlen` of at least the `group`")
        return (effective_bits - at0) / (at1 - at0)

    def at_effective_bits(self, effective_bits: float, head_dim: int, seqlen: int | None = None,
                          caps: tuple[int, int] | None = None) -> "CodebookConfig":
        """This configuration with the code ``budget`` that makes exactly ``effective_bits`` (codes,
        scales, exact sinks; :meth:`code_bits`) and per-channel caps ``(bits_q, bits_k)`` —
        by default ``⌈budget⌉ + 2`` bits (at most 8). ValueError (naming the effective bits) if the
        overheads alone leave less than 1 code bit."""
        budget = round(self.code_bits(effective_bits, head_dim, seqlen), 6)
        cap = min(cb.MAX_BITS, max(cb.MIN_BITS, math.ceil(budget) + 2))
        bits_q, bits_k = caps or (cap, cap)
        try:
            return replace(self, budget=budget, bits_q=bits_q, bits_k=bits_k)
        except ConfigError as e:
            raise ConfigError(f"{effective_bits:g} effective bits leave {budget:.3f} code bits per entry after scales "
                              f"and sinks: {e.template}") from None
