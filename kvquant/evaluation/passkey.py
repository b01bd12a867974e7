"""Long-context retrieval: the passkey task through a KV cache.

The standard passkey prompt (Mohtashami & Jaggi 2023, as in LongLoRA and KV-cache papers): an
instruction, a filler paragraph repeated until the prompt has ``length`` tokens, a random 5-digit
key stated once at ``depth`` (0 = right after the instruction, 1 = right before the question),
and the question at the end. The model answers greedily through a fresh cache of each row; the
answer is correct when the first 5 digits it generates are the key. A prompt's key, and so its
tokens, depend only on ``(seed, length, depth)``: every row sees the same prompts.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
#: Tokens generated per answer: 5 digits, a leading space, and room for tokenizers that split digits oddly.
ANSWER_TOKENS = 8


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt: ``ids`` (1, length) int64, the ``key`` it hides, where (``depth`` in [0, 1], the
    token index ``needle_at``)."""

    ids: torch.Tensor
    key: str
    length: int
    depth: float
    seed: int
    needle_at: int


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def passkey_prompt(tokenizer: Any, length: int, depth: float, seed: int, bos: bool = False) -> PasskeyPrompt:
    """The prompt of ``length`` tokens (BOS included when ``bos``) with the key at ``depth``:
    ``[BOS] instruction · filler × m · needle · filler × (n − m) · question``, the filler repeated
    as many whole times as fit and the needle placed after ⌊depth·n + ½⌋ of them; the rest of the
    length is made up by a prefix of one more filler before the question."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(random.Random(f"{seed}:{length}:{depth}").randint(10000, 99999))
    head = ([tokenizer.bos_token_id] if bos else []) + _encode(tokenizer, INSTRUCTION)
    needle, question, filler = (_encode(tokenizer, t) for t in (NEEDLE.format(key=key), QUESTION, FILLER))
    room = length - len(head) - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"passkey length {length} is too short: the instruction, key and question alone take "
                         f"{length - room} tokens")
    n, rest = divmod(room, len(filler))
    m = int(depth * n + 0.5)
    ids = head + filler * m + needle + filler * (n - m) + filler[:rest] + question
    return PasskeyPrompt(torch.tensor([ids]), key, length, depth, seed, len(head) + m * len(filler))


def answer_is(text: str, key: str) -> bool:
    """Whether ``text`` (the generated continuation) answers ``key``: its first 5 digits are the key."""
    return "".join(re.findall(r"\d", text))[:5] == key


@dataclass
class PasskeyResult:
    """Accuracy of one row over the grid: ``correct[(length, depth)]`` counts seeds answered
    right out of ``trials[(length, depth)]``."""

    name: str
    correct: dict[tuple[int, float], int] = field(default_factory=dict)
    trials: dict[tuple[int, float], int] = field(default_factory=dict)
    answers: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def accuracy(self, length: int, depth: float | None = None) -> float:
        """Share answered right at ``length`` (and ``depth``; every depth when None)."""
        cells = [c for c in self.trials if c[0] == length and (depth is None or c[1] == depth)]
        return sum(self.correct[c] for c in cells) / sum(self.trials[c] for c in cells)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["correct"] = {f"{k[0]}@{k[1]:g}": v for k, v in self.correct.items()}
        d["trials"] = {f"{k[0]}@{k[1]:g}": v for k, v in self.trials.items()}
        return d


@torch.no_grad()
def run_passkey(model: torch.nn.Module, tokenizer: Any, caches: dict[str, Callable[[], Any]], lengths: list[int],
                depths: list[float], seeds: int, bos: bool = False, progress: bool = True) -> dict[str, PasskeyResult]:
    """Every row (a factory of fresh caches, e.g. :func:`kvquant.evaluation.generation.cache_factories`)
    answers every prompt of ``lengths`` × ``depths`` × ``range(seeds)``, greedily through its own
    fresh cache (prefill of the prompt, then :data:`ANSWER_TOKENS` decoding steps)."""
    from kvquant.hf.compat import cache_kwargs
    from kvquant.hf.placement import input_device

    device = input_device(model)
    results = {name: PasskeyResult(name) for name in caches}
    grid = [(n, d, s) for n in lengths for d in depths for s in range(seeds)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(total=len(grid) * len(caches), desc="passkey", unit="answer", disable=not progress)
    for length, depth, seed in grid:
        p = passkey_prompt(tokenizer, length, depth, seed, bos)
        ids = p.ids.to(device)
        for name, new in caches.items():
            bar.set_postfix_str(f"{name} · {length} tokens · depth {depth:g}")
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(new()),
                                 max_new_tokens=ANSWER_TOKENS, do_sample=False, pad_token_id=pad)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            r, cell = results[name], (length, depth)
            ok = answer_is(text, p.key)
            r.correct[cell] = r.correct.get(cell, 0) + ok
            r.trials[cell] = r.trials.get(cell, 0) + 1
            r.answers.append({"length": length, "depth": depth, "seed": seed, "key": p.key, "answer": text, "ok": ok})
            r.seconds += time.perf_counter() - t0
            bar.update()
    bar.close()
    return results


def format_passkey(results: dict[str, PasskeyResult], lengths: list[int], ref: str = "fp",
                   threshold: float = 0.9) -> str:
    """Markdown table: accuracy per row and length (over depths and seeds); a row's cell is marked
    ``*`` where ``ref`` retrieves less than ``threshold`` at that length (not judged there)."""
    base = results.get(ref)
    lines = ["| row | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for name, r in results.items():
        cells = []
        for n in lengths:
            judged = base is None or base.accuracy(n) >= threshold or name == ref
            cells.append(f"{r.accuracy(n):.0%}" + ("" if judged else "*"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_heatmap(result: PasskeyResult, lengths: list[int], depths: list[float], path, title: str) -> None:
    """Accuracy heatmap (depth × length) of one row, written to ``path`` as it is (PNG; matplotlib,
    the ``plot`` extra): the caller makes it atomic, e.g. with the run's other outputs
    (:func:`kvquant.io.fileio.atomic_paths`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [[result.accuracy(n, d) for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.45 * len(depths)))
    try:
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(acc):
            for j, a in enumerate(row):
                ax.text(j, i, f"{a:.0%}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("key depth")
        ax.set_title(title, fontsize=8)
        fig.colorbar(im, ax=ax, label="retrieved")
        fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
