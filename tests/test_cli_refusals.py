"""Inputs that once ran silently or ended in a traceback: each is refused before any work with one
line naming the option and the fix, or made right (tests/test_faults.py has the rest)."""

from __future__ import annotations

import subprocess

import pytest
from conftest import text_of
from test_faults import books_file, refused  # noqa: F401  (books_file: a fixture)

from kvquant import cli
from kvquant.hf.placement import parse_max_memory


@pytest.mark.parametrize("lengths,depths,needle", [("200,200", "50", "--lengths lists 200 more than once"),
                                                    ("60", "50,50,33.3", "--depths lists 50 more than once"),
                                                    ("", "50", "--lengths is empty")])
def test_passkey_cells_counted_once(model_dir, capsys, lengths, depths, needle):
    """The same prompt listed twice was counted as two trials (and printed as two columns)."""
    refused(["eval-passkey", "--model", model_dir, "--lengths", lengths, "--depths", depths, "--seeds", 1],
            capsys, needle)


@pytest.mark.parametrize("text,needle", [("cpu=20GiB,cpu=1KiB", "names cpu twice"), ("cpu=0", "positive number"),
                                         ("0=lots", "positive number")])
def test_max_memory_refused(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_max_memory(text)
    assert parse_max_memory("0=20GiB, cpu=300MiB") == {0: "20GiB", "cpu": "300MiB"}


def test_generation_mode_window_within_one_group_refused(model_dir, books_file, capsys):  # noqa: F811
    """With --seqlen at most the key group no key is ever quantized: every row would equal fp."""
    books, text = books_file  # group 8
    refused(["eval-ppl", "--model", model_dir, "--codebooks", books, "--text-file", text, "--seqlen", 8,
             "--windows", 1, "--mode", "generation", "--baselines", "fp", "--allow-overlap"],
            capsys, "--seqlen 8", "equal fp", "use --seqlen > 8")


def test_generate_refusals(model_dir, books_file, capsys):  # noqa: F811
    books, _ = books_file
    base = ["generate", "--model", model_dir, "--codebooks", books]
    refused(base + ["--prompt", "x", "--bits-v", 0], capsys, "--bits-v 0")
    refused(base + ["--prompt", "caf\udce9 \udcff\udcfe"], capsys, "--prompt is not valid UTF-8")  # argv of bytes
    refused(base + ["--prompt", text_of(10), "--max-new-tokens", 1000000000], capsys,
            "--max-new-tokens 1000000000", "trained context (64 tokens)")


def test_passkey_outputs_appear_together_or_not_at_all(model_dir, books_file, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A kill while the heatmaps are written left some PNGs and no JSON."""
    pytest.importorskip("matplotlib")
    import kvquant.evaluation.passkey as pk

    real, calls = pk.plot_heatmap, []

    def dies_on_the_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise SystemExit(143)  # what SIGTERM raises while an atomic write is open
        real(*args)

    monkeypatch.setattr(pk, "plot_heatmap", dies_on_the_second)
    plots, js = tmp_path / "plots", tmp_path / "pk.json"
    argv = ["eval-passkey", "--model", str(model_dir), "--codebooks", str(books_file[0]), "--baselines", "kivi@4/4",
            "--lengths", "54", "--depths", "0", "--seeds", "1", "--plots", str(plots), "--json", str(js)]
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 143 and len(calls) == 2 and not js.exists() and list(plots.iterdir()) == []
    monkeypatch.setattr(pk, "plot_heatmap", real)
    assert cli.main(argv) == 0 and js.exists() and len(list(plots.iterdir())) == 3
    capsys.readouterr()


def test_immutable_output_refused_before_work(model_dir, tmp_path, capsys):
    out = tmp_path / "books.safetensors"
    out.write_bytes(b"old")
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        refused(["calibrate", "--model", model_dir, "--text-file", tmp_path / "none.txt", "--out", out],
                capsys, f"--out {out}", "cannot write")
    finally:
        subprocess.run(["chattr", "-i", str(out)])
    assert out.read_bytes() == b"old"


@pytest.mark.parametrize("drop", ["config.bits_v", "config.sink", "config.scale_bits", "config.budget_sides",
                                  "calibration.seqlen", "calibration.source", "calibration"])
def test_codebook_file_without_what_it_needs_refused(books_file, tmp_path, drop):  # noqa: F811
    """Files without the calibration record were taken as held out (and budgeted for seqlen 2048);
    files whose config lacks a field loaded with its default, changing the bits held."""
    import json as js

    from safetensors import safe_open
    from safetensors.torch import save_file

    from kvquant.codebooks import Codebooks

    with safe_open(str(books_file[0]), framework="pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    part, _, key = drop.partition(".")
    if key:
        record = js.loads(meta[part])
        del record[key]
        meta[part] = js.dumps(record)
    else:
        del meta[part]
    path = tmp_path / "edited.safetensors"
    save_file(t, str(path), metadata=meta)
    with pytest.raises(ValueError, match=f"lacks {drop if key else 'calibration.source'}"):
        Codebooks.load(path)


@pytest.mark.parametrize("native", [True, False])
def test_dtype_defaults_to_what_the_model_ships_in(tmp_path, text_file, capsys, caplog, monkeypatch, native):
    """--dtype auto (the default): the offline models ship in bfloat16, a local folder in its config's dtype;
    loaded in it where the device computes it natively, else in float32 with a warning naming why and the
    override (either way on any CPU: the hardware check is replaced here)."""
    import torch
    from conftest import make_model, make_tokenizer

    from kvquant.io import assets, dtypes

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert assets.shipped_dtype("smollm2-135m") == assets.shipped_dtype("gemma3-270m") == torch.bfloat16
    assert dtypes.native_dtype(torch.bfloat16, "cpu") is native and dtypes.native_dtype(torch.float32, "cpu")
    folder = tmp_path / "bf16-model"
    make_model("llama").to(torch.bfloat16).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    loaded = torch.bfloat16 if native else torch.float32
    with caplog.at_level("WARNING", logger="kvquant.io.dtypes"):
        assert assets.load_model(str(folder))[0].dtype == loaded
    assert ("ships in bfloat16" in caplog.text and "--dtype bfloat16" in caplog.text) is not native
    assert cli.main(["eval-ppl", "--model", str(folder), "--text-file", str(text_file), "--seqlen", "16",
                     "--windows", "1", "--baselines", "fp"]) == 0
    assert f"dtype {str(loaded).removeprefix('torch.')}" in capsys.readouterr().out
    for given in ("float32", "bfloat16"):  # an explicit --dtype is taken as given
        assert cli.main(["eval-ppl", "--model", str(folder), "--text-file", str(text_file), "--seqlen", "16",
                         "--windows", "1", "--baselines", "fp", "--dtype", given]) == 0
        assert f"dtype {given}" in capsys.readouterr().out


def test_config_errors_name_their_fields_once():
    """CodebookConfig's errors mark the fields they are about: plain in Python, as the options that set them
    in the CLI — and only those words (prose such as "the exact sink tokens" stays prose)."""
    from kvquant.cli.options import option_text
    from kvquant.codebooks import CodebookConfig, ConfigError

    with pytest.raises(ConfigError) as caught:
        CodebookConfig(norm="channel-group", group=8, sink=8)
    e = caught.value
    assert str(e).startswith("sink (8) must be smaller than group (8) with norm 'channel-group'")
    assert "`" not in str(e)
    cli_text = option_text(e)
    assert cli_text.startswith("--sink (8) must be smaller than --group (8) with --norm 'channel-group'")
    assert cli_text.endswith("the exact sink tokens are kept inside the first group")
    assert option_text(ValueError("group")) == "group"  # other errors pass through as they are


def test_cli_writes_config_fields_as_options(capsys):
    refused(["calibrate", "--norm", "head", "--outliers", "0.1", "--out", "x.safetensors"], capsys,
            "--outliers > 0 needs --norm 'channel-group' (they are found per group); got --norm 'head'")
