"""Files that are whole or absent: temp name beside the target, then rename; nothing survives a kill.

Every temp file or folder is named ``.<target name>.<pid>.<random>.tmp`` in the target's folder:

* on an exception, Ctrl-C (SIGINT) or SIGTERM/SIGHUP the temp is removed and the target is left as
  it was (:func:`signals_raise` turns those signals into ``SystemExit`` while a write is open, where
  the process still has their default handler);
* a SIGKILL cannot be caught: the next write into that folder removes the temps of processes that
  are no longer running (:func:`remove_stale`).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")
_LEGACY_TEMP = re.compile(r"^(?P<name>.+)\.tmp-(?P<pid>\d+)$")  # kvquant <= 0.1's asset temps: <name>.tmp-<pid>
_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s))


def _raise_exit(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """While open, SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` so that ``finally`` and
    ``except BaseException`` cleanups run (a no-op outside the main thread and for signals whose
    handler someone else set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed = [s for s in _SIGNALS if signal.getsignal(s) == signal.SIG_DFL]
    for s in installed:
        signal.signal(s, _raise_exit)
    try:
        yield
    finally:
        for s in installed:
            signal.signal(s, signal.SIG_DFL)


def pid_running(pid: int) -> bool:
    """True when a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temps (of ``name``, else of any target) in ``folder`` left by processes that are
    no longer running — what a SIGKILL leaves. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMP.match(entry.name) or _LEGACY_TEMP.match(entry.name)
        if m and (name is None or m["name"] == name) and not pid_running(int(m["pid"])):
            _remove(entry)
            removed.append(entry)
    return removed


def probe_write(folder: str | os.PathLike) -> None:
    """Create and remove a file in ``folder``: raises the OSError a write there would (permissions
    alone do not tell, e.g. for root or on a read-only mount)."""
    probe = Path(folder) / f".kvquant-probe.{os.getpid()}"
    probe.touch()
    probe.unlink()


def temp_path(target: str | os.PathLike) -> Path:
    """A fresh temp name beside ``target`` (nothing is created): ``.<name>.<pid>.<random>.tmp``."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (not created: write a file or a folder there); when the
    block ends normally rename it onto ``path``. On an exception or a terminating signal the temp
    is removed and ``path`` is left as it was. Stale temps of ``path`` from killed runs are removed
    first."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent, target.name)
    tmp = temp_path(target)
    with signals_raise():
        try:
            yield tmp
            os.replace(tmp, target)
        except BaseException:
            _remove(tmp)
            raise


@contextmanager
def temp_folder(parent: str | os.PathLike, name: str) -> Iterator[Path]:
    """A scratch folder ``parent/.<name>.<pid>.<random>.tmp``, removed when the block ends (also on
    a terminating signal; after a SIGKILL by the next :func:`remove_stale` of ``parent``)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent, name)
    tmp = temp_path(parent / name)
    tmp.mkdir()
    with signals_raise():
        try:
            yield tmp
        finally:
            _remove(tmp)


@contextmanager
def atomic_paths(paths: list[str | os.PathLike]) -> Iterator[list[Path]]:
    """:func:`atomic_path` for several outputs of one run: the temps (one per path, in order) are
    renamed onto their targets only once the block has written all of them; an exception or a
    terminating signal before that removes every temp and leaves every target as it was."""
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_path(p)) for p in paths]


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def replace_section(path: str | os.PathLike, name: str, body: str) -> None:
    """Replace the block between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in a
    markdown file (appending the block if absent), atomically."""
    p = Path(path)
    text = p.read_text(encoding="utf-8") if p.exists() else ""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    write_text(p, text)
