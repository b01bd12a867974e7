"""Fault injection: bad options, bad files, a damaged asset cache, kills during writes, NaN/inf.

Every failure of the command line is one line ``kvquant CMD: error: …`` naming the option or file,
exit status 2, no traceback (unless ``-v``), and nothing written; a kill leaves nothing that the
next run does not remove, and never a damaged target.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import damaged_copy, make_model, make_tokenizer, text_of

from kvquant.io import assets
from kvquant.io import fileio
from kvquant.io.assets import AssetError
from kvquant.cli import main
from kvquant.codebooks import Codebooks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def books_file(model_dir, tmp_path_factory):
    """A small allocated codebook file (2 windows of 16 tokens from the end of a 400-word text)."""
    folder = tmp_path_factory.mktemp("books")
    text = folder / "corpus.txt"
    text.write_text(text_of(400), encoding="utf-8")
    out = folder / "books.safetensors"
    assert main(["calibrate", "--model", str(model_dir), "--text-file", str(text), "--seqlen", "16", "--samples", "2",
                 "--group", "8", "--effective-bits", "6", "--out", str(out)]) == 0
    return out, text


def refused(argv, capsys, *needles) -> str:
    """Run the CLI: it must fail with exit 2 and one line naming every needle, no traceback."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors (a value of the wrong type)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if ": error: " in line]  # beside progress bars of loading
    assert len(lines) == 1 and lines[0].startswith("kvquant "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def calib(model_dir, text_file, out, *extra):
    return ["calibrate", "--model", model_dir, "--text-file", text_file, "--seqlen", 16, "--samples", 2, "--group", 8,
            "--out", out, *extra]


# --- bad options: checked before any model is loaded (a missing model would be named otherwise) ---------------


@pytest.mark.parametrize("extra, needles", [
    (("--seqlen", 1), ("--seqlen", ">= 2", "got 1")),
    (("--samples", 0), ("--samples",)),
    (("--bits-k", 9), ("--bits-k", "1..8")),
    (("--outliers", 0.9), ("--outliers",)),
    (("--bits-q", 2), ("--bits-q alone would be ignored", "give both")),
    (("--budget-sides", "k", "--effective-bits", 0), ("--budget-sides would be ignored",)),
    (("--budget", 3, "--effective-bits", 4), ("not both",)),
    (("--dtype", "float64"), ("--dtype",)),
])
def test_bad_options_refused_before_the_model_loads(tmp_path, text_file, capsys, extra, needles):
    argv = calib(tmp_path / "no-such-model", text_file, tmp_path / "b.safetensors", *extra)  # the last value wins
    refused(argv, capsys, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


@pytest.mark.parametrize("argv, needles", [
    (["calibrate", "--seqlen", "1.5"], ("--seqlen", "invalid int value")),
    (["calibrate", "--outliers", "nan"], ("--outliers", "got nan")),
    (["calibrate", "--norm", "head", "--group", 8], ("--group would be ignored",)),
    (["calibrate", "--norm", "channel", "--scale-bits", 8, "--effective-bits", 0], ("--scale-bits 8 needs --norm",)),
    (["calibrate", "--budget", 0.5, "--effective-bits", 0], ("--budget", "must be in [1")),
    (["calibrate", "--device", "cuda:7"] if torch.cuda.device_count() < 8 else ["calibrate", "--device", "bogus"],
     ("--device",)),
    (["calibrate", "--device", "bogus"], ("--device 'bogus' is not a device",)),
    (["calibrate", "--text-file", "no/such/file.txt"], ("--text-file no/such/file.txt: no such file",)),
    (["eval-ppl", "--json", ""], ("--json is empty",)),
    (["eval-ppl", "--baselines", ",,"], ("--baselines ',,' names no row",)),
    (["eval-ppl", "--baselines", "fp,kivi@2/9", "--mode", "generation"], ("--baselines: unknown row 'kivi@2/9'",
                                                                            "kivi@BITS")),
    (["eval-passkey", "--lengths", "abc"], ("--lengths takes comma-separated numbers",)),
    (["eval-passkey", "--lengths", "0"], ("--lengths are token counts >= 1",)),
    (["assets", "--list", "--force"], ("--list only lists",)),
])
def test_more_bad_options_one_line_before_load(tmp_path, text_file, capsys, argv, needles):
    """Found by a hostile pass: each refused in one line, before the (missing) model is loaded."""
    if argv[0] in ("calibrate", "eval-ppl") and "--text-file" not in argv:
        argv = argv + ["--text-file", text_file]
    if argv[0] == "calibrate":
        argv = argv + ["--out", tmp_path / "b.safetensors"]
    if argv[0] != "assets":
        argv = argv + ["--model", tmp_path / "no-such-model"]
    refused(argv, capsys, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_config_file_paths_are_applied_and_named(tmp_path, text_file, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"text_file: {tmp_path / 'missing.txt'}\n")  # applied: an ignored key would not fail
    refused(["calibrate", "--config", cfg, "--out", tmp_path / "b.safetensors"], capsys, "--text-file", "no such file")
    cfg.write_text("seqlen: 0\n")
    refused(["calibrate", "--config", cfg, "--text-file", text_file, "--out", tmp_path / "b.safetensors"], capsys,
            "--seqlen must be >= 2", "from config file", "run.yaml")


def test_seqlen_beyond_the_trained_context_refused(model_dir, text_file, tmp_path, capsys):
    refused(calib(model_dir, text_file, tmp_path / "b.safetensors", "--seqlen", 100), capsys,
            "--seqlen 100 is beyond the model's trained context (64 tokens)")
    refused(["eval-ppl", "--model", model_dir, "--text-file", text_file, "--seqlen", 65, "--windows", 1,
             "--baselines", "fp"], capsys, "--seqlen 65")


def test_unwritable_outputs_refused_before_work(tmp_path, text_file, capsys):
    model = tmp_path / "no-such-model"  # never reached: the output check comes first
    folder = tmp_path / "a-folder"
    folder.mkdir()
    refused(calib(model, text_file, folder), capsys, "--out", "is a directory")
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    refused(calib(model, text_file, blocker / "sub" / "b.safetensors"), capsys, "--out", "is a file, not a folder")
    refused(["eval-ppl", "--model", model, "--text-file", text_file, "--json", folder], capsys, "--json", "directory")
    refused(["eval-passkey", "--model", model, "--plots", blocker], capsys, "--plots", "not a folder")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        refused(calib(model, text_file, ro / "b.safetensors"), capsys, "--out", "cannot write")


def test_config_file_errors_name_the_file(tmp_path, text_file, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seqlen: 16\nmethod: [lambda\n")
    refused(["calibrate", "--config", bad, "--out", tmp_path / "b.safetensors"], capsys, "bad.yaml", "not valid YAML",
            "line")
    bad.write_text("seqlen: 2k\n")
    refused(["calibrate", "--config", bad, "--out", tmp_path / "b.safetensors"], capsys, "bad.yaml", "seqlen",
            "an integer", "'2k'")
    bad.write_text("seqlen: 16\nsequence_length: 16\n")
    refused(["calibrate", "--config", bad, "--out", tmp_path / "b.safetensors"], capsys, "bad.yaml",
            "unknown option(s) sequence_length")


def test_non_utf8_text_names_the_file(model_dir, tmp_path, capsys):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(("café " * 400).encode("latin-1"))
    refused(calib(model_dir, latin, tmp_path / "b.safetensors"), capsys, "latin1.txt", "not UTF-8", "iconv")


def test_verbose_shows_the_traceback(tmp_path, text_file, capsys):
    assert main(["-v", "calibrate", "--text-file", str(text_file), "--seqlen", "1", "--out", str(tmp_path / "b")]) == 2
    assert "Traceback" in capsys.readouterr().err


# --- bad codebook files: the schema check on load names the file and the tensor ---------------------------------


def _swap_layers(t, meta):
    fp = json.loads(meta["fingerprint"])
    fp["num_layers"] = 3  # the tensors hold 2 layers
    meta["fingerprint"] = json.dumps(fp)


@pytest.mark.parametrize("edit, needle", [
    (lambda t, m: t.update({"k.centers": t["k.centers"].to(torch.int32)}), "k.centers is int32, not float32"),
    (lambda t, m: t.pop("q.scale"), "tensor q.scale is missing"),
    (lambda t, m: t.pop("stats.n"), "stats.n"),
    (_swap_layers, "expected (3, "),
    (lambda t, m: t.update({"k.centers": t["k.centers"].flip(-1).contiguous()}), "k.centers are not finite and sorted"),
    (lambda t, m: t["q.scale"].view(-1).__setitem__(0, float("nan")), "q.scale holds NaN"),
    (lambda t, m: t.update({"k.channel_levels": t["k.channel_levels"].int()}), "k.channel_levels is int32"),
    (lambda t, m: m.update({"config": "{not json"}), "metadata is damaged"),
])
def test_damaged_codebook_file_refused_on_load(books_file, tmp_path, edit, needle):
    bad = damaged_copy(books_file[0], tmp_path / "bad.safetensors", edit)
    with pytest.raises(ValueError) as err:
        Codebooks.load(bad)
    assert str(bad) in str(err.value) and needle in str(err.value), err.value


def test_damaged_codebook_file_refused_before_any_row_runs(model_dir, books_file, tmp_path, capsys):
    bad = damaged_copy(books_file[0], tmp_path / "bad.safetensors",
                        lambda t, m: t.update({"k.centers": t["k.centers"].to(torch.int32)}))
    refused(["eval-ppl", "--model", model_dir, "--text-file", books_file[1], "--seqlen", 16, "--windows", 2,
             "--codebooks", bad], capsys, "bad.safetensors", "int32")
    assert "fp" not in capsys.readouterr().out  # no table started


# --- calibration / evaluation windows overlapping ----------------------------------------------------------------


def test_overlapping_windows_refused_or_labelled(model_dir, books_file, tmp_path, capsys):
    books, text = books_file
    fit = _windows_that_fit(model_dir, text)  # the calibration took the last 2 of them
    argv = ["eval-ppl", "--model", model_dir, "--text-file", text, "--seqlen", 16, "--codebooks", books,
            "--baselines", "fp", "--windows"]
    refused(argv + [fit - 1], capsys, "overlap", "calibration windows", "--allow-overlap")
    js = tmp_path / "ppl.json"
    assert main([str(a) for a in argv + [fit - 2, "--json", js]]) == 0  # all the others are held out
    assert json.loads(js.read_text())["held_out"] is True
    capsys.readouterr()
    assert main([str(a) for a in argv + [fit, "--allow-overlap", "--json", js]]) == 0
    assert "NOT HELD OUT" in capsys.readouterr().out
    assert json.loads(js.read_text())["held_out"] is False


def _windows_that_fit(model_dir, text) -> int:
    from transformers import AutoTokenizer

    from kvquant.io.data import tokenize

    return int(tokenize(AutoTokenizer.from_pretrained(model_dir), text.read_text()).numel()) // 16


def test_overlap_from_files_without_token_range(model_dir, books_file):
    """Files written before the range was recorded: the calibration windows are the last ones."""
    from transformers import AutoTokenizer

    from kvquant.io.data import calibration_overlap, make_windows

    _, text = books_file
    tok = AutoTokenizer.from_pretrained(model_dir)
    fit = _windows_that_fit(model_dir, text)
    record = {"source": str(text), "windows": 2, "seqlen": 16}
    first = make_windows(tok, text.read_text(), 16, fit - 2, source=str(text))
    assert calibration_overlap(record, first) is None
    assert "overlap" in calibration_overlap(record, make_windows(tok, text.read_text(), 16, fit - 1, source=str(text)))
    assert calibration_overlap({**record, "source": "enwiki-excerpt"}, first) is None


# --- NaN/inf: named where it arises ----------------------------------------------------------------------------


def _nan_in_layer(model, layer: int, proj: str = "q_proj"):
    with torch.no_grad():
        getattr(model.model.layers[layer].self_attn, proj).weight[0, 0] = float("nan")
    return model


def test_nan_in_calibration_named_by_layer_and_side():
    from kvquant.hf.calibrate import calibrate

    model = _nan_in_layer(make_model("llama"), 1, "k_proj")
    with pytest.raises(FloatingPointError, match="keys of attention layer 1 hold NaN/inf.*nothing is quantized"):
        calibrate(model, torch.randint(3, 128, (1, 12)), progress=False)


def _nan_out_of_attention(model, layer: int):
    """A forward hook that makes attention layer ``layer``'s output NaN (one entry): a fault that
    reaches the logits on every CPU, unlike a NaN weight, which some SDPA kernels (AVX-512) absorb."""

    def hook(module, args, output):
        out = output[0].clone()
        out[..., 0, 0] = float("nan")
        return (out, *output[1:])

    model.model.layers[layer].self_attn.register_forward_hook(hook)
    return model


def test_nan_in_evaluation_blames_the_right_step():
    from kvquant.evaluation.perplexity import evaluate

    ids = torch.randint(3, 128, (1, 12))
    model = _nan_out_of_attention(make_model("llama"), 1)
    with torch.no_grad():
        assert not torch.isfinite(model(ids).logits).all()  # the fault is really there
    with pytest.raises(FloatingPointError, match=r"unquantized model \(fp\).*attention layer 1.*before any quantization"):
        evaluate(model, ids, {"fp": None}, progress=False)

    def nan_keys(x, layer, side):  # the first token's key NaN: every query reads it beside finite ones
        # (a key that is NaN for every token is not a fault everywhere: AVX-512 SDPA treats a row of
        # NaN scores as fully masked and gives zeros)
        if (layer, side) != (1, "k"):
            return x
        x = x.clone()
        x[:, :, 0] = float("nan")
        return x

    from kvquant.hf.wrap import wrapped

    clean = make_model("llama")
    with wrapped(clean, nan_keys), torch.no_grad():
        assert not torch.isfinite(clean(ids).logits).all()  # NaN keys do reach the logits
    with pytest.raises(FloatingPointError, match=r"row broken .*attention layer 1 .*reference is finite"):
        evaluate(clean, ids, {"fp": None, "broken": nan_keys}, progress=False)


# --- models and wrap -------------------------------------------------------------------------------------------


def test_architecture_without_attention_refused_before_weights(tmp_path):
    from transformers import MambaConfig

    from kvquant.io.fingerprint import UnsupportedModelError

    MambaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="mamba.*no attention heads"):
        assets.load_model(str(tmp_path))  # no weights in the folder: the config alone decides


def test_wrap_refuses_a_non_callable():
    from kvquant import wrap

    with pytest.raises(TypeError, match="Codebooks.load"):
        wrap(make_model("llama"), "out/default.safetensors")


def test_local_model_folder_that_does_not_load(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(AssetError, match=f"model folder {tmp_path} could not be loaded"):
        assets.load_model(str(tmp_path))


# --- the asset cache: verified before use, repaired with --force -----------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KVQUANT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _cached_model(home: Path, name: str = "smollm2-135m") -> Path:
    folder = home / "models" / name
    folder.mkdir(parents=True)
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    assets._write_manifest(folder)
    return folder


def test_damaged_cached_model_named_with_the_repair(home):
    folder = _cached_model(home)
    assert assets.ensure_model("smollm2-135m") == folder
    weights = next(folder.glob("*.safetensors"))
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(AssetError, match=r"cached smollm2-135m is damaged .*bytes.*kvquant assets --force smollm2-135m"):
        assets.ensure_model("smollm2-135m")
    config = folder / "config.json"
    weights.unlink()
    _cached_model_files_back(folder)
    text = config.read_text()
    config.write_text(text.replace('"', "'", 1))  # same size, other content
    with pytest.raises(AssetError, match="config.json changed.*--force"):
        assets.load_model("smollm2-135m")


def _cached_model_files_back(folder: Path) -> None:
    make_model("llama").save_pretrained(folder)
    assets._write_manifest(folder)


def test_damaged_gguf_and_corpus_named_then_repaired(home, monkeypatch):
    spec = assets.MODELS["smollm2-135m"]
    gguf = home / "downloads" / spec.gguf_name
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"x" * 1000)
    assets.record(gguf)
    gguf.write_bytes(b"x" * 500)  # truncated after it was verified
    with pytest.raises(AssetError, match="has 500 bytes, 1000 when it was written.*--force smollm2-135m"):
        assets.ensure_gguf("smollm2-135m")
    corpus = home / "data" / "enwiki-excerpt.txt"
    corpus.parent.mkdir(parents=True)
    corpus.write_text("article text")
    assert assets.ensure_corpus("enwiki-excerpt") == corpus  # an earlier cache: recorded as it is
    corpus.write_text("article tExt")
    with pytest.raises(AssetError, match="enwiki-excerpt is damaged.*changed|sha256"):
        assets.ensure_corpus("enwiki-excerpt")
    removed = assets.remove_cached("enwiki-excerpt")
    assert corpus in removed and not corpus.exists() and not Path(f"{corpus}.sha256").exists()
    assert gguf in assets.remove_cached("smollm2-135m") and not gguf.exists()


def test_killed_conversion_debris_removed_by_the_next_run(home):
    folder = _cached_model(home)
    debris = home / "models" / f"smollm2-135m.tmp-{2**22 + 7}"  # what SIGKILL left mid-conversion
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"x" * 100)
    assert assets.ensure_model("smollm2-135m") == folder
    assert sorted(p.name for p in (home / "models").iterdir()) == ["smollm2-135m"]


def test_unwritable_cache_named(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "home-is-a-file"
    blocker.write_text("x")
    monkeypatch.setenv("KVQUANT_HOME", str(blocker))
    with pytest.raises(AssetError, match="not writable.*set KVQUANT_HOME"):
        assets.ensure_corpus("enwiki-excerpt")
    refused(["assets", "enwiki-excerpt"], capsys, "KVQUANT_HOME")


# --- kills during writes -----------------------------------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import importlib.util, sys, time
    from pathlib import Path
    # kvquant/io/fileio.py alone (the package would import torch): seconds less per test
    spec = importlib.util.spec_from_file_location("fileio", Path("kvquant") / "io" / "fileio.py")
    fileio = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fileio)
    atomic_path = fileio.atomic_path
    target = Path(sys.argv[1])
    with atomic_path(target) as tmp:
        tmp.write_text("half-written")
        print("writing", flush=True)
        time.sleep(60)
""")

_SAVER = textwrap.dedent("""
    import sys, time
    import kvquant.codebooks.books as cbm
    real = cbm.save_file
    def slow_save(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        print("writing", flush=True)
        time.sleep(60)
    cbm.save_file = slow_save
    cbm.Codebooks.load(sys.argv[1]).save(sys.argv[2])
""")

_CLI = textwrap.dedent("""
    import sys, time
    from kvquant import cli
    from kvquant.cli import parser
    from kvquant.io.fileio import atomic_path
    def slow(args):
        with atomic_path(sys.argv[1]) as tmp:
            tmp.write_text("half-written")
            print("writing", flush=True)
            time.sleep(60)
    parser.cmd_assets = slow  # build_parser binds it when main runs
    sys.exit(cli.main(["assets"]))
""")


_CAUGHT = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _dispositions(ignored: tuple[int, ...] = ()) -> Callable[[], None]:
    """A ``preexec_fn`` giving the child default dispositions for the signals these tests send, whatever
    the test runner inherited (a background job or ``nohup`` ignores SIGINT/SIGHUP, and a child
    inherits SIG_IGN), then ignoring ``ignored`` (as ``nohup`` does SIGHUP)."""

    def preexec() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _CAUGHT)  # a blocked mask also passes through fork and exec
        for s in _CAUGHT:
            signal.signal(s, signal.SIG_IGN if s in ignored else signal.SIG_DFL)

    return preexec


def _start(script: str, *args, ignored: tuple[int, ...] = ()) -> subprocess.Popen:
    """The child running ``script``, once it printed "writing" (at most 120 s, then the test fails)."""
    import selectors

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            preexec_fn=_dispositions(ignored))
    _CHILDREN.append(proc)
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout=120)
    line = proc.stdout.readline() if ready else ""
    why = proc.stderr.read() if proc.poll() is not None else "(still running)"
    assert line.strip() == "writing", f"the child did not start writing: {line!r} {why}"
    return proc


_CHILDREN: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_child_left():
    """Children of a failed signal test are killed, not left sleeping."""
    yield
    while _CHILDREN:
        proc = _CHILDREN.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_during_a_write_leaves_the_target_as_it_was(tmp_path, sig):
    target = tmp_path / "result.json"
    target.write_text("previous")
    proc = _start(_WRITER, target)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"] and target.read_text() == "previous"


def test_an_ignored_sighup_stays_ignored_during_a_write(tmp_path):
    """Under ``nohup`` (SIGHUP ignored) a hang-up must not end a run that writes: only signals whose
    handler is the default are turned into a clean exit."""
    target = tmp_path / "result.json"
    target.write_text("previous")
    proc = _start(_WRITER, target, ignored=(signal.SIGHUP,))
    proc.send_signal(signal.SIGHUP)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)  # still writing
    proc.terminate()
    proc.wait(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"] and target.read_text() == "previous"


def test_signals_raise_leaves_other_handlers_alone():
    before = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM)}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with fileio.signals_raise():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is fileio._raise_exit
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_sigkill_debris_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "result.json"
    proc = _start(_WRITER, target)
    proc.kill()
    proc.wait(timeout=30)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".result.json.") and left[0].endswith(".tmp")  # what SIGKILL leaves
    fileio.write_text(target, "next run")
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"] and target.read_text() == "next run"


def test_sigterm_during_codebooks_save(books_file, tmp_path):
    target = tmp_path / "books.safetensors"
    proc = _start(_SAVER, books_file[0], target)
    proc.terminate()
    proc.wait(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_a_cli_run_exits_143_clean(tmp_path):
    target = tmp_path / "out.json"
    proc = _start(_CLI, target)
    proc.terminate()
    proc.wait(timeout=30)
    assert proc.returncode == 143 and list(tmp_path.iterdir()) == []


def test_stale_download_temps_removed_live_ones_kept(tmp_path):
    dead = tmp_path / f".kvquant-pip.{2**22 + 12345}.abcd.tmp"  # above the usual pid_max: not running
    dead.mkdir()
    (dead / "wheel.whl").write_bytes(b"x")
    legacy = tmp_path / f"kvquant-pip.tmp-{2**22 + 12345}"  # an earlier kvquant's name for the same
    legacy.mkdir()
    live = fileio.temp_path(tmp_path / "kvquant-pip")
    live.mkdir()  # this process's own, still in use
    with fileio.temp_folder(tmp_path, "kvquant-pip") as scratch:
        assert scratch.is_dir()
    assert not dead.exists() and not legacy.exists() and live.exists() and not scratch.exists()


def test_make_cache_refuses_a_codebook_path_naming_codebooks_load():
    """make_cache(model, "FILE"): a TypeError naming Codebooks.load(path), not an AttributeError of
    the string (as wrap(model, codebooks) refuses what is no quantizer)."""
    from kvquant.cache import make_cache

    model = make_model("llama")
    for path in ("out/default.safetensors", Path("out/default.safetensors")):
        with pytest.raises(TypeError, match=r"^make_cache\(model, codebooks\): codebooks must be a kvquant\.Codebooks, "
                                            r"got \w+ 'out/default\.safetensors'; load a codebook file with "
                                            r"Codebooks\.load\(path\)$"):
            make_cache(model, path)
    with pytest.raises(TypeError, match=r"got NoneType; load a codebook file with Codebooks\.load\(path\)$"):
        make_cache(model, None)
