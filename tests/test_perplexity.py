"""nll_sum / make_rows / evaluate on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SEQ, make_model, random_ids

from kvquant.hf.calibrate import CalibrationConfig, calibrate
from kvquant.codebooks import CodebookConfig
from kvquant.evaluation.perplexity import evaluate, format_table, make_rows, nll_sum
from kvquant.hf.wrap import is_wrapped


@pytest.fixture
def books(llama):
    cfg = CalibrationConfig(CodebookConfig(method="lambda", bits_q=3, bits_k=5))
    return calibrate(llama, random_ids(3, SEQ, seed=11), cfg, progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_nll_sum_equals_model_loss(family):
    model = make_model(family)
    ids = random_ids(3, SEQ, seed=2)
    total, count = nll_sum(model, ids, progress=False)
    assert count == 3 * (SEQ - 1)
    with torch.no_grad():
        want = sum(float(model(row[None], labels=row[None]).loss) * (SEQ - 1) for row in ids)
    assert total == pytest.approx(want, rel=1e-6)


def test_nll_sum_refuses_nan(llama):
    # (NaN q/k would not do: torch's CPU SDPA turns NaN scores into zero outputs)
    with torch.no_grad():
        llama.lm_head.weight[5] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        nll_sum(llama, random_ids(1, SEQ), progress=False)


def test_evaluate_rows_in_order_with_effective_bits(llama, books):
    ids = random_ids(2, SEQ, seed=3)
    names = ["lambda", "fp", "int4", "int4-channel", "uniform", "int8"]
    rows = evaluate(llama, ids, make_rows(names, books), progress=False)
    assert list(rows) == names
    assert not is_wrapped(llama)
    bits = {k: r.effective_bits for k, r in rows.items()}
    assert bits == {"lambda": 4.0, "fp": 32.0, "int4": 4 + 16 / 16, "int4-channel": 4.25, "uniform": 4.0,
                    "int8": 8 + 16 / 16}
    total, count = nll_sum(llama, ids, progress=False)
    fp = rows["fp"]
    assert fp.tokens == count == 2 * (SEQ - 1)
    assert fp.nll == pytest.approx(total / count, rel=1e-12) and fp.ppl == pytest.approx(math.exp(total / count), rel=1e-12)
    for r in rows.values():
        assert math.isfinite(r.ppl) and r.ppl > 1 and r.seconds >= 0
        assert r.to_dict()["name"] == r.name
    assert rows["lambda"].ppl != fp.ppl and rows["int4"].ppl != fp.ppl
    table = format_table(rows)
    assert table.count("\n") == len(names) + 1 and "| fp | 32.00 |" in table


def test_make_rows(books):
    rows = make_rows(["fp", "lambda", "lloydmax", "fp8"], books)
    assert rows["fp"] is None
    assert rows["lambda"] is books  # the file's own method is used as is
    assert rows["lloydmax"].config.method == "lloydmax" and rows["lloydmax"].config.bits_q == 3
    assert rows["fp8"].effective_bits(16) == 9.0


def test_unknown_row_lists_valid_names(books):
    with pytest.raises(ValueError, match="unknown row 'int9'") as err:
        make_rows(["fp", "int9"], books)
    for valid in ("fp", "int2..int8", "fp8", "lambda", "lloydmax"):
        assert valid in str(err.value)


def test_codebook_row_without_codebooks():
    with pytest.raises(ValueError, match="--codebooks"):
        make_rows(["lambda"], None)


def test_evaluate_needs_windows(llama):
    with pytest.raises(ValueError, match=">= 2 tokens"):
        evaluate(llama, random_ids(1, 1), {"fp": None}, progress=False)
    with pytest.raises(ValueError, match=">= 2 tokens"):
        evaluate(llama, torch.zeros(0, 8, dtype=torch.long), {"fp": None}, progress=False)


def test_effective_bits_follow_dtype():
    model = make_model("llama").to(torch.bfloat16)
    rows = evaluate(model, random_ids(1, SEQ), {"fp": None}, progress=False)
    assert rows["fp"].effective_bits == 16.0


def test_rows_at_effective_bits_equal_a_calibration_at_those_bits():
    """``lambda@3`` from a 5-bit allocated file = calibrating with --effective-bits 3 on the same windows
    (tiny windows of 24 tokens: group scales and the sink cost 1.3 + 0.7 bits here)."""
    from conftest import tiny_books

    family = dict(norm="channel-group", group=12, sink=1, scale_bits=8)
    five = CodebookConfig("lambda-lloyd", **family).at_effective_bits(5.0, head_dim=8, seqlen=24)
    model, ids, books = tiny_books(**{k: getattr(five, k) for k in ("method", "bits_q", "bits_k", "budget")}, **family)
    rows = make_rows(["lambda@3", "lambda-lloyd"], books, seqlen=24)
    assert rows["lambda-lloyd"] is books
    got = rows["lambda@3"]
    three = CodebookConfig("lambda", **family).at_effective_bits(3.0, head_dim=8, seqlen=24)
    want = calibrate(model, ids, CalibrationConfig(three), progress=False)
    assert got.config == want.config and got.effective_bits(seqlen=24) == pytest.approx(3.0, abs=0.05)
    for side in ("q", "k"):
        for name, t in getattr(want, side).tensors(side).items():
            torch.testing.assert_close(getattr(got, side).tensors(side)[name], t, msg=name)


def test_rows_at_effective_bits_need_fisher_weights_and_seqlen(books):
    with pytest.raises(ValueError, match="Fisher weights"):
        make_rows(["lambda@2"], books, seqlen=SEQ)
    with pytest.raises(ValueError, match="seqlen"):
        make_rows(["lambda@2"], books)
    with pytest.raises(ValueError, match="METHOD@BITS"):
        make_rows(["int4@2"], books, seqlen=SEQ)


def _direct_divergence(model, ids, quantizer):
    """KL(p_fp ‖ p_row) per predicted token and top-1 agreement from full logits, held at once."""
    from kvquant.hf.wrap import wrapped

    with torch.no_grad(), wrapped(model, None):
        fp = torch.cat([model(r[None]).logits[0, :-1] for r in ids]).log_softmax(-1)
    with torch.no_grad(), wrapped(model, quantizer):
        q = torch.cat([model(r[None]).logits[0, :-1] for r in ids]).log_softmax(-1)
    kld = (fp.exp() * (fp - q)).sum(-1).double()
    return kld, (fp.argmax(-1) == q.argmax(-1)).double().mean()


def test_kl_divergence_and_top1_against_fp(llama, books):
    """Every row's KLD/top-1 against the fp row equal the direct computation on all logits held at
    once; the fp row gives 0, 0, 1; without an fp row they are not computed."""
    ids = random_ids(3, SEQ, seed=4)
    rows = evaluate(llama, ids, make_rows(["int4", "fp", "int2"], books), progress=False)
    fp = rows["fp"]
    assert (fp.kld, fp.kld_p99, fp.top1) == (0.0, 0.0, 1.0)
    for name in ("int4", "int2"):
        kld, top1 = _direct_divergence(llama, ids, make_rows([name], books)[name])
        r = rows[name]
        assert r.kld == pytest.approx(float(kld.mean()), rel=1e-4) and r.kld > 0
        assert r.kld_p99 == pytest.approx(float(torch.quantile(kld, 0.99)), rel=1e-4)
        assert r.top1 == pytest.approx(float(top1), abs=1e-12) and r.top1 < 1
    assert rows["int2"].kld > rows["int4"].kld  # 2 bits are further from fp than 4
    table = format_table(rows)
    assert "| KLD | KLD p99 | top-1 |" in table and "| fp | 32.00 | " in table and "| 0.00000 | 0.0000 | 100.00% |" in table
    alone = evaluate(llama, ids, make_rows(["int4"], books), progress=False)["int4"]
    assert alone.kld is None and alone.ppl == pytest.approx(rows["int4"].ppl, rel=1e-12)
    assert "KLD" not in format_table({"int4": alone})


def test_agreement_refuses_shape_mismatch():
    from kvquant.evaluation.divergence import Agreement

    with pytest.raises(ValueError, match="differ"):
        Agreement().add(torch.zeros(3, 5), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="no positions"):
        Agreement().summary()


@pytest.mark.parametrize("row,why", [("quanto@4.5", "whole bits"), ("hqq@2.99", "whole bits"),
                                     ("quanto@3", "takes 2, 4 bits"), ("hqq@5", "takes 1, 2, 3, 4, 8 bits")])
def test_library_rows_refuse_bits_they_cannot_run(row, why):
    """A row runs at the bits it names or is refused before anything runs (quanto@4.5 ran at 4 bits,
    labelled 4.5; quanto@3 failed only after the fp row)."""
    from kvquant.evaluation.perplexity import make_rows

    with pytest.raises(ValueError, match=why):
        make_rows(["fp", row], None, seqlen=16, generation=True)
