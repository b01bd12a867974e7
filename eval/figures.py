"""Shared by the eval scripts: the perplexity-vs-effective-bits figure (matplotlib, ``.[plot]``)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from kvquant.io.fileio import atomic_path


@contextmanager
def ppl_figure(p: dict, path: Path, xlabel: str, note: str, size: tuple[float, float], **legend):
    """Yield ``(ax, plt)`` to draw the series on; then add the unquantized line (``p["rows"]["fp"]``),
    log-scale perplexity axis, labels, the payload's protocol as title (+ ``note``), legend and
    grid, and write the PNG to ``path`` atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = p["rows"]["fp"]["ppl"]
    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax, plt
        ax.axhline(fp, color="k", linewidth=0.8, label=f"unquantized {fp:.2f}")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"{p['model']} · {p['dataset']} · seqlen {p['seqlen']} · {p['eval_windows']} windows · "
                     f"Q and K quantized{note}", fontsize=9)
        ax.legend(**legend)
        ax.grid(alpha=0.3)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
