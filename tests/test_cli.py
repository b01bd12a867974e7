"""``kvquant.cli.main`` end to end on a tiny saved model, an offline tokenizer and a local text file."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
from conftest import make_model, make_tokenizer, text_of

from kvquant.cli import DEFAULTS, main
from kvquant.codebooks import Codebooks
from kvquant.kernels import prefill_cpu


def run(argv) -> int:
    """``main``'s exit status, also when it exits through SystemExit."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # as the interpreter would: a message goes to stderr with status 1
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)
        return 1


def calibrate_args(model_dir, text_file, out, *extra):
    """Calibration of 2 windows of 16 tokens; groups of 8 (the default 128 would leave every token
    exact) and, unless ``extra`` chooses the norm or the budget, 6 effective bits per key entry (the
    default 3.65 leaves no code bits at this size: the scales cost 2 bits, the sink 1)."""
    target = [] if {"--norm", "--budget", "--effective-bits"} & set(map(str, extra)) else ["--effective-bits", 6]
    static = any(str(a) == "--norm" and str(b) != "channel-group" for a, b in zip(extra, extra[1:]))
    group = [] if static else ["--group", 8]  # a static norm has no groups (--group would be refused)
    return ["calibrate", "--model", model_dir, "--text-file", text_file, "--seqlen", 16, "--samples", 2,
            *group, *target, "--out", out, *extra]


def eval_args(model_dir, text_file, *extra):
    return ["eval-ppl", "--model", model_dir, "--text-file", text_file, "--seqlen", 16, "--windows", 2, *extra]


def test_calibrate_then_eval_ppl(model_dir, text_file, tmp_path, capsys):
    books_path = tmp_path / "out" / "books.safetensors"
    args = ("--bits-q", 3, "--bits-k", 5, "--method", "lambda", "--norm", "head", "--sink", 0)
    assert run(calibrate_args(model_dir, text_file, books_path, *args)) == 0
    assert "wrote" in capsys.readouterr().out
    books = Codebooks.load(books_path)
    assert (books.config.method, books.config.bits_q, books.config.bits_k) == ("lambda", 3, 5)
    assert books.calibration["windows"] == 2 and books.calibration["seqlen"] == 16
    assert books.fingerprint.num_layers == 2 and books.fingerprint.num_kv_heads == 2
    assert sorted(p.name for p in books_path.parent.iterdir()) == ["books.safetensors"]

    js = tmp_path / "ppl.json"
    rc = run(eval_args(model_dir, text_file, "--codebooks", books_path, "--baselines", "fp,int4-channel", "--json", js))
    assert rc == 0
    out = capsys.readouterr().out
    assert "| fp | 32.00 |" in out and "| lambda | 4.00 |" in out
    payload = json.loads(js.read_text())
    rows = payload["rows"]
    assert list(rows) == ["fp", "int4-channel", "lambda"]
    assert rows["fp"]["effective_bits"] == 32.0 and rows["int4-channel"]["effective_bits"] == 4.25
    assert rows["lambda"]["effective_bits"] == 4.0
    for r in rows.values():
        assert r["ppl"] > 1 and r["tokens"] == 2 * 15
    assert rows["lambda"]["ppl"] != rows["fp"]["ppl"]
    assert payload["windows"] == 2 and payload["seqlen"] == 16 and payload["bos_prepended"] is False


def test_eval_ppl_without_codebooks_skips_codebook_rows(model_dir, text_file, tmp_path, capsys):
    js = tmp_path / "ppl.json"
    assert run(eval_args(model_dir, text_file, "--baselines", "fp,lambda,int8", "--json", js)) == 0
    assert "skipping rows lambda" in capsys.readouterr().err
    assert list(json.loads(js.read_text())["rows"]) == ["fp", "int8"]


def _assert_refused(rc, capsys, tmp_path, *needles, keep=()):
    err = capsys.readouterr().err
    assert rc == 2, err
    for needle in needles:
        assert needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep), "nothing may be written"


def test_calibrate_refuses_bits_9(model_dir, text_file, tmp_path, capsys):
    rc = run(calibrate_args(model_dir, text_file, tmp_path / "b.safetensors", "--bits-k", 9))
    _assert_refused(rc, capsys, tmp_path, "--bits-k", "9", keep=["corpus.txt"])


def test_calibrate_refuses_missing_text_file(model_dir, tmp_path, capsys):
    rc = run(calibrate_args(model_dir, tmp_path / "missing.txt", tmp_path / "b.safetensors"))
    _assert_refused(rc, capsys, tmp_path, "missing.txt")


def test_calibrate_refuses_empty_text_file(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    rc = run(calibrate_args(model_dir, empty, tmp_path / "b.safetensors"))
    _assert_refused(rc, capsys, tmp_path, "empty", keep=["empty.txt"])


def test_calibrate_refuses_text_too_short(model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text(text_of(20), encoding="utf-8")
    rc = run(calibrate_args(model_dir, short, tmp_path / "b.safetensors"))
    _assert_refused(rc, capsys, tmp_path, "window", keep=["short.txt"])


def test_eval_ppl_refuses_bad_input(model_dir, text_file, tmp_path, capsys):
    js = tmp_path / "ppl.json"
    rc = run(eval_args(model_dir, tmp_path / "missing.txt", "--baselines", "fp", "--json", js))
    _assert_refused(rc, capsys, tmp_path, "missing.txt", keep=["corpus.txt"])
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    rc = run(eval_args(model_dir, empty, "--baselines", "fp", "--json", js))
    _assert_refused(rc, capsys, tmp_path, "empty", keep=["corpus.txt", "empty.txt"])
    rc = run(eval_args(model_dir, text_file, "--baselines", "fp,int9", "--json", js))
    _assert_refused(rc, capsys, tmp_path, "unknown row 'int9'", keep=["corpus.txt", "empty.txt"])
    rc = run(eval_args(model_dir, text_file, "--codebooks", tmp_path / "nope.safetensors", "--json", js))
    _assert_refused(rc, capsys, tmp_path, "no codebook file", keep=["corpus.txt", "empty.txt"])


def test_eval_ppl_refuses_codebooks_of_another_model(model_dir, text_file, tmp_path, capsys):
    other = tmp_path / "other"
    make_model("llama", num_hidden_layers=3).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    books = tmp_path / "b.safetensors"
    assert run(calibrate_args(other, text_file, books)) == 0
    capsys.readouterr()
    js = tmp_path / "ppl.json"
    rc = run(eval_args(model_dir, text_file, "--codebooks", books, "--baselines", "fp", "--json", js))
    _assert_refused(rc, capsys, tmp_path, "num_layers", keep=["b.safetensors", "corpus.txt", "other"])


def test_calibrate_without_out_exits_2(model_dir, text_file, tmp_path, capsys):
    rc = run(["calibrate", "--model", model_dir, "--text-file", text_file, "--seqlen", 16, "--samples", 2])
    assert "--out" in capsys.readouterr().err
    assert rc == 2
    rc = run(eval_args(model_dir, text_file, "--dtype", "float64"))
    assert "--dtype" in capsys.readouterr().err
    assert rc == 2


def test_argparse_errors_exit_2(capsys):
    assert run(["calibrate", "--method", "kmeans"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_calibrate_defaults_are_the_best_measured_configuration(model_dir, text_file, tmp_path):
    books_path = tmp_path / "default.safetensors"
    assert run(calibrate_args(model_dir, text_file, books_path)) == 0
    c = Codebooks.load(books_path).config
    assert (c.method, c.norm, c.sink, c.scale_bits, c.rope) == ("lambda-lloyd", "channel-group", 1, 8, "pre")
    assert (c.budget_sides, c.bits_v) == ("k", 4)  # the deployed cache: keys allocated, 4-bit values
    assert DEFAULTS["group"] == 64 and c.group == 8 and DEFAULTS["effective_bits"] == 3.65
    # exactly 6 effective bits per key entry at seqlen 16: code + 16/8 (scales) + 16/16 (the sink) = 6 → 3 code bits, caps ⌈·⌉ + 2
    assert c.budget == pytest.approx(3.0, abs=1e-6) and (c.bits_q, c.bits_k) == (5, 5)
    rc = run(calibrate_args(model_dir, text_file, books_path, "--group", 128))
    assert rc == 2
    # a static normalisation does not inherit the default family's allocation and 8-bit scales
    assert run(calibrate_args(model_dir, text_file, books_path, "--norm", "head", "--sink", 0)) == 0
    c = Codebooks.load(books_path).config
    assert (c.norm, c.budget, c.scale_bits, c.bits_q, c.budget_sides) == ("head", 0.0, 16, 4, "qk")


def test_calibrate_with_a_bit_budget(model_dir, text_file, tmp_path, capsys):
    books_path = tmp_path / "alloc.safetensors"
    args = ("--bits-q", 4, "--bits-k", 4, "--budget", 2.5, "--group", 4, "--sink", 1)
    assert run(calibrate_args(model_dir, text_file, books_path, *args)) == 0
    assert "budget 2.5" in capsys.readouterr().out
    books = Codebooks.load(books_path)
    assert books.config.budget == 2.5 and books.hist.fisher_q is not None
    assert 2.5 - 0.25 <= books.k.mean_bits <= 2.5 and books.q.channel_levels is None  # the keys' budget (default sides k)
    assert run(calibrate_args(model_dir, text_file, books_path, "--budget", 5, "--bits-q", 4)) == 2
    assert "budget" in capsys.readouterr().err


def test_calibrate_at_exact_effective_bits(model_dir, text_file, tmp_path, capsys):
    books_path = tmp_path / "exact.safetensors"
    args = ("--bits-q", 4, "--bits-k", 4, "--group", 8, "--scale-bits", 8, "--sink", 1)
    assert run(calibrate_args(model_dir, text_file, books_path, *args, "--effective-bits", 4.5)) == 0
    out = capsys.readouterr().out
    books = Codebooks.load(books_path)
    assert f"{books.effective_bits(seqlen=16):.3f} effective bits" in out
    # seqlen 16: code + 16/8 + 16 · 1/16 = 4.5 → 1.5 code bits on average
    assert books.config.budget == pytest.approx(1.5, abs=1e-6)
    assert 4.5 - 0.1 <= books.effective_bits(seqlen=16) <= 4.5 + 1e-6
    # 3.5 bits: the scales and the exact first token alone cost 3 of them, fewer than the 1-bit minimum remains
    assert run(calibrate_args(model_dir, text_file, books_path, *args, "--effective-bits", 3.5)) == 2
    assert "3.5 effective bits leave 0.500 code bits" in capsys.readouterr().err
    assert run(calibrate_args(model_dir, text_file, books_path, *args, "--effective-bits", 4, "--budget", 2)) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["default", "paper", "3bit", "2bit"])
def test_shipped_configs_are_valid(name):
    from pathlib import Path

    from kvquant.cli import DEFAULTS, config_values, codebook_config

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    values = config_values(str(path))
    assert set(values) <= set(DEFAULTS), f"unknown keys in {path.name}: {set(values) - set(DEFAULTS)}"
    config = codebook_config({**DEFAULTS, **values})
    if name == "default":
        assert codebook_config(DEFAULTS) == config  # the file and the CLI defaults agree
        assert all(DEFAULTS[k] == v for k, v in values.items())


def test_eval_ppl_generation_mode(model_dir, text_file, tmp_path, capsys):
    """--mode generation: fp through DynamicCache, the codebooks through kvquant's cache (the
    default pre-RoPE, 8-bit-scale, allocated family); K/V bits and bytes per token reported."""
    books_path = tmp_path / "books.safetensors"
    assert run(calibrate_args(model_dir, text_file, books_path, "--group", 4, "--effective-bits", 6)) == 0
    js = tmp_path / "gen.json"
    rc = run(eval_args(model_dir, text_file, "--codebooks", books_path, "--baselines", "fp", "--mode", "generation",
                       "--bits-v", 4, "--json", js))
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "generation mode" in out and "4-bit values (hadamard per token, KIVI rows minmax)" in out and "| row | K/V bits held (mean / end / max) | bytes/token (end) |" in out
    payload = json.loads(js.read_text())
    assert payload["mode"] == "generation" and payload["bits_v"] == 4
    fp, q = payload["rows"]["fp"], payload["rows"]["lambda-lloyd"]
    assert fp["effective_bits"] == 32.0 and fp["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # K+V, 2 layers × 2 heads × 16, fp32
    assert q["kv_bytes_per_token"] < fp["kv_bytes_per_token"] / 2 and q["ppl"] != fp["ppl"]
    assert (fp["kld"], fp["kld_p99"], fp["top1"]) == (0.0, 0.0, 1.0)
    assert 0 < q["kld"] <= q["kld_p99"] and 0 < q["top1"] <= 1 and "| KLD | KLD p99 | top-1 |" in out
    # per-row value bits, keys-only allocation at exact key bits, the KIVI-style INT cache
    rc = run(eval_args(model_dir, text_file, "--codebooks", books_path, "--baselines", "lambda-lloyd@5/2,kivi@4/2,kivi@4",
                       "--mode", "generation", "--json", js))
    assert rc == 0, capsys.readouterr().err
    rows = json.loads(js.read_text())["rows"]
    assert list(rows) == ["fp", "lambda-lloyd@5/2", "kivi@4/2", "kivi@4", "lambda-lloyd"]  # fp added: the reference
    assert "adding row fp" in capsys.readouterr().err
    exact_v, v2 = rows["kivi@4"], rows["kivi@4/2"]
    assert exact_v["kv_bytes_per_token"] > v2["kv_bytes_per_token"]  # the same keys, values 2-bit vs exact fp32
    assert rows["lambda-lloyd@5/2"]["kv_bytes_per_token"] < exact_v["kv_bytes_per_token"]
    assert run(eval_args(model_dir, text_file, "--codebooks", books_path, "--baselines", "lambda@4/2")) == 2
    assert "--mode generation" in capsys.readouterr().err
    # rows that are not caches, and --bits-v without generation mode, are refused up front
    assert run(eval_args(model_dir, text_file, "--codebooks", books_path, "--baselines", "fp,int4", "--mode", "generation")) == 2
    assert "int4" in capsys.readouterr().err
    assert run(eval_args(model_dir, text_file, "--baselines", "fp", "--bits-v", 4)) == 2
    assert "--mode generation" in capsys.readouterr().err
    assert run(eval_args(model_dir, text_file, "--baselines", "fp", "--mode", "generation", "--values", "minmax")) == 2
    assert "--bits-v" in capsys.readouterr().err


def test_eval_ppl_quantizes_queries_beside_each_cache(model_dir, text_file, tmp_path, capsys):
    """--queries B: each codebook row runs again with its queries quantized causally (row 'ROW +qB'),
    the same cache and bits held; the fp row is left alone; bad combinations are refused."""
    books_path = tmp_path / "books.safetensors"
    assert run(calibrate_args(model_dir, text_file, books_path, "--group", 4, "--effective-bits", 6)) == 0
    js = tmp_path / "q.json"
    rc = run(eval_args(model_dir, text_file, "--codebooks", books_path, "--baselines", "fp,kivi@4", "--mode", "generation",
                       "--queries", 3, "--json", js))
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "rows '+q3' queries quantized causally at 3 bits" in out
    payload = json.loads(js.read_text())
    rows = payload["rows"]
    assert list(rows) == ["fp", "kivi@4", "kivi@4 +q3", "lambda-lloyd", "lambda-lloyd +q3"] and payload["queries"] == 3
    for name in ("kivi@4", "lambda-lloyd"):
        plain, queried = rows[name], rows[f"{name} +q3"]
        assert queried["kv_bytes_per_token"] == plain["kv_bytes_per_token"]
        assert queried["effective_bits"] == plain["effective_bits"]
        assert queried["ppl"] != plain["ppl"] and queried["kld"] > 0
    assert run(eval_args(model_dir, text_file, "--codebooks", books_path, "--baselines", "fp", "--queries", 3)) == 2
    assert "--mode generation" in capsys.readouterr().err
    assert run(eval_args(model_dir, text_file, "--baselines", "fp", "--mode", "generation", "--queries", 3)) == 2
    assert "--codebooks" in capsys.readouterr().err


def test_generate_prints_the_continuation_and_the_cache_bytes(model_dir, text_file, tmp_path, capsys, monkeypatch):
    books_path = tmp_path / "books.safetensors"
    assert run(calibrate_args(model_dir, text_file, books_path, "--group", 4, "--effective-bits", 6)) == 0
    capsys.readouterr()
    rc = run(["generate", "--model", model_dir, "--codebooks", books_path, "--prompt", text_of(12), "--max-new-tokens", 5])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.strip() and "bytes per token held" in captured.err and "for an fp16 cache" in captured.err
    assert "the newest incomplete group of up to 3 tokens as INT8 per token" in captured.err
    assert run(["generate", "--model", model_dir, "--codebooks", books_path, "--prompt", "x", "--max-new-tokens", 0]) == 2
    if prefill_cpu.available()[0]:  # the prompt's attention from INT8 codes, every layer's
        calls, real = [], prefill_cpu.prefill_attention
        monkeypatch.setattr(prefill_cpu, "prefill_attention", lambda *a: calls.append(a[0].shape[2]) or real(*a))
        rc = run(["generate", "--model", model_dir, "--codebooks", books_path, "--prompt", text_of(12),
                  "--max-new-tokens", 5, "--prefill", "int8"])
        assert rc == 0 and capsys.readouterr().out.strip() and len(calls) == 2 and calls[0] > 1


def test_eval_passkey(model_dir, text_file, tmp_path, capsys):
    """eval-passkey: every row answers the same prompts through its cache; accuracy table, JSON of
    every answer, one heatmap per row; lengths beyond the trained context and bad depths refused."""
    pytest.importorskip("matplotlib")
    books_path = tmp_path / "books.safetensors"
    assert run(calibrate_args(model_dir, text_file, books_path)) == 0
    js, plots = tmp_path / "pk.json", tmp_path / "plots"
    rc = run(["eval-passkey", "--model", model_dir, "--codebooks", books_path, "--baselines", "kivi@4/4",
              "--lengths", "54,56", "--depths", "0,100", "--seeds", 2, "--json", js, "--plots", plots])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "| row | 54 tokens | 56 tokens |" in out
    payload = json.loads(js.read_text())
    assert list(payload["rows"]) == ["fp", "kivi@4/4", "lambda-lloyd"] and payload["depths"] == [0.0, 1.0]
    for r in payload["rows"].values():
        assert len(r["answers"]) == 2 * 2 * 2 and r["trials"] == {"54@0": 2, "54@1": 2, "56@0": 2, "56@1": 2}
    assert sorted(p.name for p in plots.iterdir()) == [f"passkey_{model_dir.name}_{n}.png" for n in
                                                       ("fp", "kivi_4_4", "lambda-lloyd")]
    assert run(["eval-passkey", "--model", model_dir, "--lengths", "60"]) == 2  # + 8 answer tokens > 64
    assert "trained context (64 tokens): use at most 56" in capsys.readouterr().err
    assert run(["eval-passkey", "--model", model_dir, "--lengths", "64", "--depths", "0,150"]) == 2
    assert "0..100" in capsys.readouterr().err
    assert run(["eval-passkey", "--model", model_dir, "--lengths", "64,x"]) == 2
    assert "comma-separated" in capsys.readouterr().err


def test_help_is_plain_text(capsys):
    """``kvquant --help`` reads as a terminal page: no reST markup from the module docstring."""
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "eval-ppl" in out and "``" not in out and ":func:" not in out


def test_bare_qk_path_works_as_typed(model_dir, text_file, tmp_path, capsys):
    """``calibrate --bits-q B --bits-k B`` quantizes queries and keys at B bits per entry (the budget
    it adds is named), and ``eval-ppl --codebooks FILE`` shows the file's own row in simulated mode;
    a keys-only file's own row there quantizes the keys only and says so."""
    qk = tmp_path / "qk.safetensors"
    argv = ["calibrate", "--model", model_dir, "--text-file", text_file, "--seqlen", 16, "--samples", 2, "--group", 8,
            "--bits-q", 6, "--bits-k", 6, "--method", "lambda", "--out", qk]
    assert run(argv) == 0
    err = capsys.readouterr().err
    assert "6 effective bits per query and key entry" in err and "--effective-bits 6 --budget-sides qk" in err
    books = Codebooks.load(qk)
    assert books.config.budget_sides == "qk" and books.effective_bits(seqlen=16) <= 6 + 1e-9
    assert books.q.mean_bits < 6 and books.k.mean_bits < 6  # the scales and the sink are paid from the code bits
    assert run(eval_args(model_dir, text_file, "--codebooks", qk, "--baselines", "fp,int4", "--allow-overlap")) == 0
    out = capsys.readouterr().out
    assert "| lambda | 6.00 |" in out
    keys = tmp_path / "keys.safetensors"
    assert run(calibrate_args(model_dir, text_file, keys)) == 0  # the default family: keys-only budget
    assert Codebooks.load(keys).config.budget_sides == "k"
    capsys.readouterr()
    assert run(eval_args(model_dir, text_file, "--codebooks", keys, "--baselines", "fp", "--allow-overlap")) == 0
    assert "| lambda-lloyd (keys only, exact queries) | 6.00 |" in capsys.readouterr().out


def test_calibrate_choices_are_the_library_names():
    """The CLI's --method and --norm choices (kept literal so --help needs no torch) are the library's."""
    from kvquant.core import scalar
    from kvquant.cli import build_parser
    from kvquant.codebooks import NORMS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["calibrate"]
    choices = {a.dest: tuple(a.choices) for a in sub._actions if a.choices}
    assert set(choices["norm"]) == set(NORMS)
    assert set(choices["method"]) == set(scalar.METHODS)
