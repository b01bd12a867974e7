"""Build a kernel's C source with the system compiler, once per source (with the headers beside it),
flags and compiler, and load it
with ctypes: the library is cached in ``$KVQUANT_HOME/kernels/`` under a hash of those, written to a
temp file and renamed (a killed build leaves no half-written library). ``-fopenmp`` is added where the
compiler takes it."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from kvquant.io.fileio import atomic_path


class KernelUnavailable(RuntimeError):
    """A CPU kernel cannot be built or loaded here (the message says why and what to do)."""


def cpu_features() -> set[str]:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiles(cc: str, flags: list[str], folder: Path) -> bool:
    src = folder / "probe.c"
    src.write_text("int main(void) { return 0; }\n")
    r = subprocess.run([cc, *flags, str(src), "-o", str(folder / "probe")], capture_output=True)
    return r.returncode == 0


def build_library(source: Path, flags: list[str], what: str, otherwise: str) -> ctypes.CDLL:
    """``source`` built with ``$CC`` (default ``cc``) and ``flags`` and loaded; raises
    :class:`KernelUnavailable` naming ``what`` and the way out ``otherwise`` when it cannot."""
    from kvquant.io.assets import cache_dir

    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise KernelUnavailable(
            f"no C compiler ({cc!r} is not on PATH) to build kvquant's {what}; install one "
            f"(e.g. apt install gcc) or set CC, {otherwise}"
        )
    folder = cache_dir() / "kernels"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelUnavailable(f"cannot create {folder} for the {what} ({e}); set KVQUANT_HOME") from e
    flags = list(flags)
    with tempfile.TemporaryDirectory() as tmp:
        if _compiles(cc, flags + ["-fopenmp"], Path(tmp)):
            flags.append("-fopenmp")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]  # what the source may include
    key = hashlib.sha256("\0".join([source.read_text(), *headers, " ".join(flags), version]).encode()).hexdigest()[:16]
    lib = folder / f"{source.stem}-{key}.so"
    if not lib.exists():
        with atomic_path(lib) as tmp:
            r = subprocess.run([cc, *flags, str(source), "-o", str(tmp)], capture_output=True, text=True)
            if r.returncode:
                raise KernelUnavailable(f"building {source.name} with {cc} failed:\n{r.stderr.strip()}")
    return ctypes.CDLL(str(lib))


def loads(library: Callable[[], ctypes.CDLL]) -> tuple[bool, str]:
    """(True, "") when ``library()`` builds and loads here, else (False, why)."""
    try:
        library()
    except KernelUnavailable as e:
        return False, str(e)
    return True, ""
