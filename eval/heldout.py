"""Shared by the eval scripts that judge one codebook file: its options, and loading the file,
the model it was calibrated for and the text its calibration windows came from."""

from __future__ import annotations

import argparse

import torch

from kvquant.io.assets import load_model
from kvquant.codebooks import Codebooks
from kvquant.io.data import load_text


def codebook_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser with ``--codebooks`` (required), ``--model`` and ``--dataset``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codebooks", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="enwiki-excerpt")
    return ap


def load(args: argparse.Namespace, dtype: torch.dtype | str = torch.float32):
    """``(books, model, tokenizer, text)``: the codebook file, its model in ``dtype`` (checked to fit;
    float32 for the float32 tables of BENCHMARKS.md) and the text (test split; pass
    ``books.calibration`` to :func:`kvquant.io.data.held_out_windows`)."""
    books = Codebooks.load(args.codebooks)
    model, tok = load_model(args.model, dtype=dtype)
    books.check_fits(model)
    return books, model, tok, load_text(args.dataset, split="test")
