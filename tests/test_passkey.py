"""kvquant.evaluation.passkey: prompts of exact length with the key where asked, scoring, rows through caches."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model
from transformers import DynamicCache

from kvquant.evaluation.passkey import ANSWER_TOKENS, NEEDLE, answer_is, format_passkey, passkey_prompt, run_passkey


class CharTokenizer:
    """One token per character (ids = code points), BOS 1, EOS 2; enough for the prompt's arithmetic."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids if int(i) > 2)


@pytest.mark.parametrize("length", [300, 301, 777])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_has_the_length_and_the_key_at_its_depth(length, depth):
    tok = CharTokenizer()
    p = passkey_prompt(tok, length, depth, seed=3, bos=True)
    ids = p.ids[0].tolist()
    assert p.ids.shape == (1, length) and ids[0] == 1 and len(p.key) == 5 and p.key.isdigit()
    needle = tok(NEEDLE.format(key=p.key))["input_ids"]
    assert ids[p.needle_at : p.needle_at + len(needle)] == needle
    text = tok.decode(ids)
    assert text.count(p.key) == 2 and text.endswith("The pass key is")
    before, after = text.index("The pass key is " + p.key), len(text) - text.index(p.key)
    if depth == 0.0:
        assert text[:before].count("The grass") == 0
    if depth == 1.0:
        assert text[-after:].count("The grass") <= 1  # only the partial filler before the question


def test_prompts_are_fixed_by_seed_length_and_depth():
    tok = CharTokenizer()
    a, b = passkey_prompt(tok, 400, 0.5, seed=0), passkey_prompt(tok, 400, 0.5, seed=0)
    assert torch.equal(a.ids, b.ids)
    keys = {passkey_prompt(tok, 400, 0.5, seed=s).key for s in range(6)}
    assert len(keys) == 6
    depths = [passkey_prompt(tok, 400, d, seed=0).needle_at for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert depths == sorted(depths) and depths[0] < depths[-1]
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(tok, 50, 0.5, seed=0)
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tok, 400, 1.5, seed=0)


def test_answer_is():
    assert answer_is(" 12345. The", "12345") and answer_is("12 3 45", "12345")
    assert not answer_is(" 1234", "12345") and not answer_is(" 12346", "12345") and not answer_is("", "12345")


def test_run_passkey_scores_what_each_row_generates(monkeypatch):
    """An oracle ``generate`` (copies the key out of the prompt) scores 100%, a wrong one 0%; every
    row sees the same prompts; the table marks lengths where fp is below 90% as not judged."""
    tok = CharTokenizer()
    model = make_model("llama", vocab_size=128)
    seen = []

    def generate(ids, cache=None, past_key_values=None, max_new_tokens=0, **_):
        cache = cache if cache is not None else past_key_values  # an empty cache is falsy
        seen.append((type(cache).__name__, ids.shape[1]))
        text = tok.decode(ids[0].tolist())
        key = text[text.index("The pass key is ") + 16:][:5]
        answer = f" {key}." if cache.oracle else " 00000."
        assert max_new_tokens == ANSWER_TOKENS
        return torch.cat([ids, torch.tensor([tok(answer)["input_ids"]])], dim=1)

    monkeypatch.setattr(model, "generate", generate)

    def cache(oracle):
        def new():
            c = DynamicCache()
            c.oracle = oracle
            return c
        return new

    res = run_passkey(model, tok, {"fp": cache(True), "bad": cache(False)}, [300, 400], [0.0, 1.0], seeds=2,
                      progress=False)
    assert len(seen) == 2 * 2 * 2 * 2 and {n for _, n in seen} == {300, 400}
    assert res["fp"].accuracy(300) == 1.0 and res["bad"].accuracy(400, 1.0) == 0.0
    assert res["fp"].trials[(300, 0.0)] == 2 and len(res["bad"].answers) == 8
    assert [a["key"] for a in res["fp"].answers] == [a["key"] for a in res["bad"].answers]
    table = format_passkey(res, [300, 400])
    assert "| fp | 100% | 100% |" in table and "| bad | 0% | 0% |" in table
    assert "| q | 100%* | 100%* |" in format_passkey({"fp": res["bad"], "q": res["fp"]}, [300, 400])


def test_run_passkey_through_real_caches_greedy():
    """On a tiny random model: the same prompts through two DynamicCache rows give the same
    answers as plain greedy decoding."""
    tok = CharTokenizer()
    model = make_model("llama", vocab_size=128)
    new = lambda: DynamicCache(config=model.config)  # noqa: E731
    res = run_passkey(model, tok, {"fp": new, "again": new}, [300], [0.5], seeds=1, progress=False)
    p = passkey_prompt(tok, 300, 0.5, seed=0)
    with torch.no_grad():
        ids = p.ids
        for _ in range(ANSWER_TOKENS):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    want = tok.decode(ids[0, 300:].tolist())
    assert res["fp"].answers[0]["answer"] == res["again"].answers[0]["answer"] == want
