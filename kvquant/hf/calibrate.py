"""Calibration: run windows of text through the model, capture the statistics of the (query,
key) pairs that multiply in every layer and head, and build codebooks from them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from kvquant.codebooks import CodebookConfig, Codebooks
from kvquant.core.density import RHO_CRITICAL
from kvquant.core.groupnorm import GroupHistogram
from kvquant.core.stats import PairStats
from kvquant.hf.attention import GradObserver, Observer, Rope
from kvquant.hf.distributed import is_main, reduce_statistics, shard
from kvquant.hf.placement import input_device
from kvquant.hf.wrap import UnsupportedModelError, controller, wrapped
from kvquant.io.fingerprint import ModelFingerprint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationConfig:
    """Codebook options plus what the statistics were computed on (stored in the file)."""

    codebooks: CodebookConfig = field(default_factory=CodebookConfig)
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _ids(windows) -> torch.Tensor:
    ids = getattr(windows, "ids", windows)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.numel() == 0:
        raise ValueError("calibration needs token windows: a non-empty LongTensor (n_windows, seqlen)")
    return ids


def run_capture(model: torch.nn.Module, windows, observer: Observer, batch_size: int = 1,
                progress: bool = True, desc: str = "calibrate", rope: Rope = "post",
                grad_observer: GradObserver | None = None) -> None:
    """Run ``windows`` (n, seqlen) through the model in capture mode, calling
    ``observer(layer, q, k, pair_mask)`` in every attention call with q and k post-RoPE, or
    with the rotary embedding undone (``rope="pre"``); the model's previous wrap state is
    restored afterwards.

    With ``grad_observer``, every batch also runs backward of its next-token loss (mean NLL over
    the batch's tokens) and ``grad_observer(layer, side, x, ∂loss/∂x)`` gets the gradients of q
    and k in the same frame; the weights are frozen meanwhile (no parameter gradients are kept).

    Raises :class:`UnsupportedModelError` if some layer never called kvquant's attention
    function (a family that bypasses ``AttentionInterface`` must not pass silently).
    """
    ids = _ids(windows)
    layers = ModelFingerprint.from_model(model).num_layers
    device = input_device(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    embed = model.get_input_embeddings()
    with wrapped(model, None), torch.set_grad_enabled(grad_observer is not None):
        ctl = controller(model)
        ctl.observer, ctl.grad_observer, ctl.calls, ctl.rope = observer, grad_observer, set(), rope
        ctl.set_mode("capture")
        model.requires_grad_(False)
        try:
            for start in tqdm(range(0, len(ids), batch_size), desc=desc, unit="batch", disable=not progress):
                batch = ids[start : start + batch_size].to(device)
                if grad_observer is None:
                    model(batch, use_cache=False)
                else:  # gradients flow from the loss to the activations only
                    x = embed(batch).detach().requires_grad_(True)
                    model(inputs_embeds=x, labels=batch, use_cache=False).loss.backward()
        finally:
            ctl.observer = ctl.grad_observer = None
            ctl.set_mode("off")
            for p in trainable:
                p.requires_grad_(True)
        missing = sorted(set(range(layers)) - ctl.calls)
    if missing:
        raise UnsupportedModelError(
            f"layers {missing} of {type(model).__name__} never called kvquant's attention function: "
            "this architecture bypasses transformers.AttentionInterface and cannot be calibrated"
        )


def capture_stats(model: torch.nn.Module, windows, batch_size: int = 1, progress: bool = True) -> PairStats:
    """Pair statistics of every layer and query head over ``windows`` (n, seqlen) of token ids."""
    fp = ModelFingerprint.from_model(model)
    stats = PairStats.zeros(fp.num_layers, fp.num_heads, fp.head_dim)
    run_capture(model, windows, stats.update, batch_size, progress)
    return stats


def capture(model: torch.nn.Module, windows, group_sinks: list[tuple] = (), batch_size: int = 1,
            progress: bool = True, rope: Rope = "post",
            fisher: bool = False) -> tuple[PairStats, dict[tuple[int, int, float, int], GroupHistogram]]:
    """One calibration pass: pair statistics, plus a :class:`GroupHistogram` for every
    ``(group, sink[, outliers[, scale_bits]])`` setting of the dynamic normalisation that is asked
    for, keyed by ``(group, sink, outliers, scale_bits)`` (0.0 and 16 where not given); q and k in
    the ``rope`` frame.
    ``fisher``: the histograms also get Fisher weights (a backward pass per batch), which bit
    allocation (``CodebookConfig.budget``) needs. In a process group (:mod:`kvquant.hf.distributed`)
    each process passes its own windows and gets the statistics of all of them."""
    fp = ModelFingerprint.from_model(model)
    stats = PairStats.zeros(fp.num_layers, fp.num_heads, fp.head_dim)
    keys = {(int(gs[0]), int(gs[1]), float(gs[2]) if len(gs) > 2 else 0.0, int(gs[3]) if len(gs) > 3 else 16)
            for gs in group_sinks}
    hists = {key: GroupHistogram.zeros(fp.num_layers, fp.num_heads, fp.num_kv_heads, group=key[0], sink=key[1],
                                       outliers=key[2], fisher=fisher, scale_bits=key[3],
                                       head_dim=fp.head_dim)
             for key in sorted(keys)}

    def observe(layer, q, k, mask):
        for side, x in (("queries", q), ("keys", k)):
            if not torch.isfinite(x).all():
                raise FloatingPointError(
                    f"calibration: the {side} of attention layer {layer} hold NaN/inf — the unquantized model "
                    f"overflows on this text in {str(x.dtype).removeprefix('torch.')} (nothing is quantized during "
                    "calibration); try --dtype float32")
        stats.update(layer, q.detach(), k.detach(), mask)
        for hist in hists.values():
            hist.update(layer, q.detach(), k.detach(), mask)

    def observe_grad(layer, side, x, grad):
        for hist in hists.values():
            hist.update_grad(layer, side, x, grad)

    run_capture(model, windows, observe, batch_size, progress, rope=rope, grad_observer=observe_grad if fisher else None)
    reduce_statistics(stats, hists)
    return stats, hists


def calibrate(model: torch.nn.Module, windows, config: CalibrationConfig | None = None, *,
              source: str = "", progress: bool = True) -> Codebooks:
    """Capture pair statistics on ``windows`` and build :class:`Codebooks` from them. In a process
    group (``accelerate launch``, :mod:`kvquant.hf.distributed`) every process passes the same windows,
    captures its share (rows rank, rank + N, …) and gets the same codebooks, built from the sums
    over all processes."""
    config = config or CalibrationConfig()
    ids = _ids(windows)
    cbc = config.codebooks
    gs = (cbc.group, cbc.sink, float(cbc.outliers), cbc.scale_bits)
    stats, hists = capture(model, shard(ids), [gs] if cbc.dynamic else [], config.batch_size,
                           progress and is_main(), cbc.rope, fisher=bool(cbc.budget))
    calibration = {"source": source or getattr(windows, "source", ""), "windows": int(ids.shape[0]),
                   "seqlen": int(ids.shape[1])}
    for k in ("first_token", "end_token", "total_tokens"):  # what eval-ppl checks its windows against
        if hasattr(windows, k):
            calibration[k] = int(getattr(windows, k))
    books = Codebooks.from_stats(stats, cbc, ModelFingerprint.from_model(model), calibration, hists.get(gs))
    for line in summary(books):
        logger.info(line)
    return books


def summary(books: Codebooks) -> list[str]:
    """One line per layer: σ_Q, σ_K and ρ ranges over heads, heads past |ρ| > 1/√3."""
    hm = books.stats.head_moments()
    lines = [f"{'layer':>5}  {'σ_Q range':>17}  {'σ_K range':>17}  {'ρ range':>17}  |ρ|>1/√3"]
    for layer in range(hm.rho.shape[0]):
        r, sq, sk = hm.rho[layer], hm.sigma_q[layer], hm.sigma_k[layer]
        past = int((r.abs() > RHO_CRITICAL).sum())
        lines.append(
            f"{layer:>5}  {sq.min():8.3f}–{sq.max():8.3f}  {sk.min():8.3f}–{sk.max():8.3f}  "
            f"{r.min():+8.3f}–{r.max():+8.3f}  {past:>3}/{len(r)}"
        )
    return lines
