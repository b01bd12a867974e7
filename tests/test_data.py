"""Token windows, text loading and the wikitext cleaner (fast, offline)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from kvquant.io import assets
from kvquant.io import data
from kvquant.io.assets import clean_wikitext

UNK, BOS, OFFSET = 0, 1, 2  # word "t{i}" has id i + OFFSET


def tiny_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over "t0".."t9999"; optionally adds <bos> like Gemma."""
    vocab = {"<unk>": UNK, "<bos>": BOS}
    vocab.update({f"t{i}": i + OFFSET for i in range(10_000)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", unk_token="<unk>")
    tok.model_max_length = 16  # a long text must not trigger (or fail on) the max-length warning
    return tok


def words(n: int) -> str:
    return " ".join(f"t{i}" for i in range(n))


@pytest.fixture(params=[False, True], ids=["no-bos", "bos"])
def tok(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return tiny_tokenizer(request.param)


def test_tokenize_whole_text_without_special_tokens(tok, caplog):
    ids = data.tokenize(tok, words(100))
    assert ids.dtype == torch.long and ids.ndim == 1
    assert ids.tolist() == list(range(OFFSET, 100 + OFFSET))
    assert "longer than the specified maximum" not in caplog.text


def test_needs_bos():
    assert data.needs_bos(tiny_tokenizer(True)) is True
    assert data.needs_bos(tiny_tokenizer(False)) is False


def test_first_n_windows_exact_and_non_overlapping(tok):
    bos = data.needs_bos(tok)
    seqlen, n = 8, 5
    w = data.make_windows(tok, words(100), seqlen, n)
    step = seqlen - bos
    assert w.ids.shape == (n, seqlen) and w.ids.dtype == torch.long
    assert w.bos_prepended is bos and w.seqlen == seqlen and len(w) == n
    assert (w.first_token, w.end_token, w.total_tokens) == (0, n * step, 100)
    if bos:
        assert (w.ids[:, 0] == BOS).all()
    body = w.ids[:, int(bos):]
    # window i holds exactly text tokens [i*step, (i+1)*step): contiguous, no overlap, no gap
    expected = torch.arange(n * step).view(n, step) + OFFSET
    assert torch.equal(body, expected)


def test_all_windows_and_last_windows(tok):
    bos = data.needs_bos(tok)
    step = 10 - bos
    all_w = data.make_windows(tok, words(95), 10, None)
    assert all_w.n == 95 // step
    last = data.make_windows(tok, words(95), 10, 2, from_end=True)
    assert last.end_token == 95 and last.first_token == 95 - 2 * step
    body = last.ids[:, int(bos):].reshape(-1)
    assert body.tolist() == list(range(95 - 2 * step + OFFSET, 95 + OFFSET))


def test_too_short_text_says_how_many_fit(tok):
    step = 10 - data.needs_bos(tok)
    with pytest.raises(ValueError, match=rf"only {50 // step} window\(s\) of seqlen 10 fit"):
        data.make_windows(tok, words(50), 10, 50 // step + 1)
    with pytest.raises(ValueError, match="only 0 window"):
        data.make_windows(tok, words(3), 10, None)


def test_calibration_and_evaluation_are_disjoint(tok):
    calib, evals = data.split_calib_eval(tok, words(200), 16, n_calib=4, n_eval=6)
    assert not calib.overlaps(evals)
    assert evals.first_token == 0 and calib.end_token == 200
    bos = int(calib.bos_prepended)
    c = set(calib.ids[:, bos:].reshape(-1).tolist())
    e = set(evals.ids[:, bos:].reshape(-1).tolist())
    assert not c & e
    fit = 200 // (16 - bos)
    with pytest.raises(ValueError, match="would overlap"):
        data.split_calib_eval(tok, words(200), 16, n_calib=fit - 5, n_eval=6)


def test_load_text_local_file_and_empty(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("hello world\n", encoding="utf-8")
    assert data.load_text(str(p)) == "hello world\n"
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        data.load_text(str(empty))


def test_load_text_hub_failure_is_clear(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(assets.AssetError, match="enwiki-excerpt") as err:
        data.load_text("wikitext2")
    assert "--text-file" in str(err.value) and "wikitext2" in str(err.value)


def test_load_text_joins_hub_rows(monkeypatch):
    import datasets

    calls = {}

    def fake(name, config=None, split=None):
        calls.update(name=name, config=config, split=split)
        return datasets.Dataset.from_dict({"text": ["a", "b", ""]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert data.load_text("wikitext2", split="test") == "a\n\nb\n\n"
    assert calls == {"name": "wikitext", "config": "wikitext-2-raw-v1", "split": "test"}


MARKUP = """{{Infobox person|name=Ada {{nowrap|Lovelace}}|image=x.jpg}}
'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref name="a">{{cite book|title=[[Ada]]}}</ref> She wrote on the [[Analytical Engine]]s.<ref name="b"/>
<!-- a hidden comment -->
[[File:Ada.jpg|thumb|A portrait of [[Ada Lovelace|Ada]] in [1840].]]
== Early life ==
She was born in [[London]] ({{convert|5|km}} away) and studied ''mathematics'' &amp; science.{{citation needed|date=May 2020}}
{| class="wikitable"
|-
! Year !! Event {{efn|nested {{in table}}}}
|-
| 1815 || born
|}
* First item of a [http://example.com/page list]
# Second item [http://example.com]
=== Works ===
Notes<br/>on the engine.
== References ==
{{reflist}}
* A reference that should vanish.
== Legacy ==
Ada Day is held in October.
[[Category:English mathematicians]]
[[de:Ada Lovelace]]
"""


def test_clean_wikitext_sample():
    out = clean_wikitext(MARKUP)
    assert out.split("\n") == [
        "Ada Lovelace was an English mathematician. She wrote on the Analytical Engines.",
        "Early life",
        "She was born in London (5 km away) and studied mathematics & science.",
        "First item of a list",
        "Second item",
        "Works",
        "Notes on the engine.",
        "Legacy",
        "Ada Day is held in October.",
    ]
    for junk in ("{{", "}}", "[[", "]]", "<ref", "'''", "Category", "portrait", "wikitable", "1815", "http", "vanish"):
        assert junk not in out


def test_clean_wikitext_links():
    assert clean_wikitext("[[a]] [[b|c]] [[d (e)|]] [[Image:x.png|y]] [[:Category:Z|zz]]") == "a c d zz"


def test_held_out_windows_refuse_calibration_overlap(tok):
    text = words(200)
    fit = 200 // (16 - int(data.needs_bos(tok)))  # windows of 16 tokens that fit the 200-word text
    calibration = {"windows": 4, "seqlen": 16}
    held = data.held_out_windows(tok, text, 16, 3, calibration)
    assert held.n == 3 and held.first_token == 0
    with pytest.raises(ValueError, match="overlap the codebooks' 4 calibration windows"):
        data.held_out_windows(tok, text, 16, fit - 2, calibration)
