"""kvquant.generation: chunked generation-mode NLL equals token-by-token decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, random_ids
from transformers import DynamicCache

from kvquant.cache import make_cache
from kvquant.calibrate import CalibrationConfig, calibrate
from kvquant.codebooks import CodebookConfig
from kvquant.compat import cache_kwargs
from kvquant.generation import chunk_starts, generation_nll


@torch.no_grad()
def stepwise_nll(model, ids, new_cache) -> float:
    total = 0.0
    for row in ids:
        cache = new_cache()
        for t in range(row.numel() - 1):
            logits = model(row[None, t : t + 1], **cache_kwargs(cache), use_cache=True).logits[0, -1]
            total += float(F.cross_entropy(logits[None], row[t + 1 : t + 2]))
    return total


@pytest.mark.parametrize("family,config", [
    ("llama", dict(norm="channel-group", group=4, sink=1, scale_bits=8, rope="pre", budget=3.0)),
    ("gemma3", dict(norm="channel-group", group=4, sink=2, rope="pre")),
    ("llama", dict(norm="channel", sink=0)),
])
def test_chunked_generation_equals_token_by_token(family, config):
    model = make_model(family)
    cfg = CodebookConfig("lambda", 4, 4, **config)
    books = calibrate(model, random_ids(2, 16, seed=7), CalibrationConfig(cfg), progress=False)
    ids = random_ids(2, 19)
    for new in (lambda: make_cache(model, books), lambda: DynamicCache(config=model.config)):
        total, count, cache = generation_nll(model, ids, new, progress=False)
        assert count == 2 * 18 and cache.get_seq_length() == 19
        assert total == pytest.approx(stepwise_nll(model, ids, new), rel=1e-5)


def test_chunk_starts():
    model = make_model("llama")
    books = calibrate(model, random_ids(2, 16, seed=7), CalibrationConfig(CodebookConfig(
        "lambda", 4, 4, norm="channel-group", group=4, sink=1)), progress=False)
    assert chunk_starts(make_cache(model, books), 14) == [0, 3, 7, 11]  # token 4k − 1 completes group k (aligned at 0)
    assert chunk_starts(make_cache(model, books, residual=2), 14) == [0, 5, 9, 13]
    assert chunk_starts(DynamicCache(), 14) == [0]
