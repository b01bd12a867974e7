"""kvquant.hf.compat: the transformers-version differences, checked on the installed version."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import EXPECTED_WINDOWS, GQA_FAMILIES, make_config, make_model, random_ids
from packaging.version import Version
from transformers import DynamicCache

from kvquant.hf.compat import TRANSFORMERS_VERSION, cache_kwargs, cache_layer_types


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_cache_layer_types_give_each_layers_window(family):
    config = make_config(family)
    got = cache_layer_types(config)
    assert [w for _, w in got] == EXPECTED_WINDOWS[family]
    assert [kind for kind, _ in got] == [
        "full_attention" if w is None else "sliding_attention" for w in EXPECTED_WINDOWS[family]
    ]


def test_cache_kwargs_pass_the_cache_without_a_deprecation_warning():
    model = make_model("llama")
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 5.24+ warns on past_key_values=
        with torch.no_grad():
            model.generate(random_ids(1, 5), **cache_kwargs(cache), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert cache.get_seq_length() == 5 + 3 - 1  # generate used this cache, not one of its own
    (name,) = cache_kwargs(cache)
    assert name == ("cache" if TRANSFORMERS_VERSION >= Version("5.24.0.dev0") else "past_key_values")
