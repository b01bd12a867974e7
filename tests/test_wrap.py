"""wrap / unwrap / wrapped / controller: the model comes back exactly as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model, random_ids

import kvquant
from kvquant.hf.attention import ATTN_NAME
from kvquant.hf.wrap import (
    UnsupportedModelError,
    attention_modules,
    controller,
    is_wrapped,
)


def identity(x, layer, side):
    return x


def halve(x, layer, side):
    return torch.round(x * 2) / 2


def leftovers(model) -> list[str]:
    return [name for name, m in model.named_modules() if hasattr(m, "kvquant")]


@torch.no_grad()
def logits(model, ids):
    return model(ids, use_cache=False).logits


def test_wrap_then_unwrap_restores(tiny_model):
    ids = random_ids(1, 8)
    ref = logits(tiny_model, ids)
    assert kvquant.wrap(tiny_model, halve) is tiny_model
    assert is_wrapped(tiny_model) and tiny_model.config._attn_implementation == ATTN_NAME
    assert len(leftovers(tiny_model)) == 2 and len(attention_modules(tiny_model)) == 2
    assert not torch.equal(logits(tiny_model, ids), ref)
    assert kvquant.unwrap(tiny_model) is tiny_model
    assert tiny_model.config._attn_implementation == "sdpa"
    assert leftovers(tiny_model) == [] and not is_wrapped(tiny_model)
    assert not any(hasattr(tiny_model, a) for a in dir(tiny_model) if a.startswith("_kvquant"))
    assert torch.equal(logits(tiny_model, ids), ref)
    with pytest.raises(ValueError, match="not wrapped"):
        controller(tiny_model)
    assert kvquant.unwrap(tiny_model) is tiny_model  # unwrapping twice is harmless


def test_unwrap_restores_eager_implementation():
    model = make_model("llama")
    model.set_attn_implementation("eager")
    ids = random_ids(1, 8)
    ref = logits(model, ids)
    kvquant.wrap(model)
    kvquant.unwrap(model)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(logits(model, ids), ref)


def test_wrapping_again_replaces_the_quantizer(llama):
    kvquant.wrap(llama, halve)
    ctl = controller(llama)
    kvquant.wrap(llama, identity)
    assert controller(llama) is ctl and ctl.quantizer is identity and ctl.mode == "quantize"
    kvquant.wrap(llama)
    assert ctl.quantizer is None and ctl.mode == "off"
    kvquant.unwrap(llama)
    assert llama.config._attn_implementation == "sdpa" and leftovers(llama) == []


def test_context_manager_restores(llama):
    ids = random_ids(1, 8)
    ref = logits(llama, ids)
    with kvquant.wrapped(llama, halve) as m:
        assert m is llama and controller(llama).mode == "quantize"
        assert not torch.equal(logits(llama, ids), ref)
    assert llama.config._attn_implementation == "sdpa" and leftovers(llama) == [] and not is_wrapped(llama)
    assert torch.equal(logits(llama, ids), ref)


def test_context_manager_restores_on_exception(llama):
    with pytest.raises(KeyError, match="boom"):
        with kvquant.wrapped(llama, halve):
            raise KeyError("boom")
    assert llama.config._attn_implementation == "sdpa" and leftovers(llama) == [] and not is_wrapped(llama)


def test_context_manager_on_wrapped_model_restores_previous_state(llama):
    kvquant.wrap(llama, halve)
    with pytest.raises(RuntimeError):
        with kvquant.wrapped(llama, identity):
            assert controller(llama).quantizer is identity
            raise RuntimeError
    assert is_wrapped(llama)
    assert controller(llama).quantizer is halve and controller(llama).mode == "quantize"
    with kvquant.wrapped(llama):
        assert controller(llama).mode == "off"
    assert controller(llama).quantizer is halve and controller(llama).mode == "quantize"
    kvquant.unwrap(llama)
    assert leftovers(llama) == []


def test_model_without_attention_modules_is_unsupported():
    class NotALanguageModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="no attention modules"):
        kvquant.wrap(NotALanguageModel())
    assert issubclass(UnsupportedModelError, ValueError)


def test_model_refusing_custom_attention_is_unsupported(llama, monkeypatch):
    def refuse(name):
        raise ValueError(f"{name} is not supported")

    monkeypatch.setattr(llama, "set_attn_implementation", refuse)
    with pytest.raises(UnsupportedModelError, match="custom attention"):
        kvquant.wrap(llama)
    assert leftovers(llama) == [] and not is_wrapped(llama)
