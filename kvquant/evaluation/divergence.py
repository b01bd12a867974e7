"""How far a quantized model's next-token distributions are from the unquantized model's.

Per predicted position t (the logits of both models on the same tokens):

    KLD_t = KL(p_fp,t ‖ p_row,t) = Σ_v p_fp,t(v) · (log p_fp,t(v) − log p_row,t(v))   [nats]
    top1_t = [argmax_v p_fp,t(v) = argmax_v p_row,t(v)]

reported as the mean KLD, its 99th percentile over positions and the share of positions where
the top token agrees (llama.cpp's ``--kl-divergence`` statistics). Pure torch: no transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

#: Rows of logits processed at once (bounds the (rows, vocab) temporaries: 256 × 262144 × 4 B = 256 MiB).
ROWS_PER_STEP = 256


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` in float32 of logits (n, vocab), computed ``ROWS_PER_STEP`` rows at a time."""
    return torch.cat([F.log_softmax(c.float(), dim=-1) for c in logits.split(ROWS_PER_STEP)])


@dataclass
class Agreement:
    """Running KL divergence and top-token agreement of one row against a reference, over the
    positions :meth:`add` has seen (one float64 per position is kept, for the percentile)."""

    kld: list[torch.Tensor] = field(default_factory=list)
    agree: int = 0
    positions: int = 0

    def add(self, ref_log_probs: torch.Tensor, logits: torch.Tensor) -> None:
        """Positions with reference log-probabilities ``ref_log_probs`` (n, vocab) and this row's
        ``logits`` (n, vocab) on the same tokens."""
        if ref_log_probs.shape != logits.shape:
            raise ValueError(f"reference log-probs {tuple(ref_log_probs.shape)} and logits {tuple(logits.shape)} differ")
        for ref, row in zip(ref_log_probs.split(ROWS_PER_STEP), logits.split(ROWS_PER_STEP)):
            lp = F.log_softmax(row.float(), dim=-1)
            self.kld.append(F.kl_div(lp, ref, reduction="none", log_target=True).sum(-1).double().cpu())
            self.agree += int((lp.argmax(-1) == ref.argmax(-1)).sum())
            self.positions += ref.shape[0]

    def add_same(self, n: int) -> None:
        """``n`` positions of the reference against itself: KLD 0, the top token agreeing."""
        self.kld.append(torch.zeros(n, dtype=torch.float64))
        self.agree += n
        self.positions += n

    def summary(self) -> tuple[float, float, float]:
        """``(mean KLD, 99th percentile of KLD, top-1 agreement)``; KLD in nats."""
        if not self.positions:
            raise ValueError("no positions compared")
        k = torch.cat(self.kld)
        return float(k.mean()), float(torch.quantile(k, 0.99)), self.agree / self.positions
