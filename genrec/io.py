"""Crash-safe file writing: nothing a reader can see is ever half-written."""

from __future__ import annotations

import contextlib
import csv
import ctypes
import fcntl
import glob
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename inside it survives power loss (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's file-mode creation mask, read without changing it where /proc has it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore (a brief race with other threads)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Write ``path`` by calling ``write(fileobj)`` on a temp file in the same dir, then rename.

    Readers see either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; the result should read like open()'s
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """rows of dicts -> CSV with the union of their keys as columns (first-seen order)."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def recover_directory(final: str | os.PathLike) -> bool:
    """Finish what a replacement killed between its two renames left: ``final`` gone but its previous
    version parked at ``.<name>.old`` -> restore it. A stray ``.old`` beside an intact ``final`` is
    removed. Returns True when ``final`` was restored."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if not old.exists():
        return False
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        return False
    try:
        os.replace(old, final)
    except FileNotFoundError:  # another process restored it first
        return final.exists()
    fsync_dir(final.parent)
    return True


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """A short exclusive section among builders into ``folder``: an flock on the directory itself (no
    lock file left behind; released if the holder dies)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _partial_prefix(final: Path) -> str:
    """Temp folders carry their builder (host, pid), so a later build can tell a dead one's leftovers."""
    return f".{final.name}.{socket.gethostname()}.{os.getpid()}."


def _remove_dead_partials(final: Path) -> None:
    """Remove ``final``'s temp folders whose builder, on this host, is no longer running."""
    host = socket.gethostname()
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        parts = stale.name[len(final.name) + 2 :].rsplit(".", 3)  # host (may hold dots), pid, random, "partial"
        if len(parts) != 4 or parts[0] != host or not parts[1].isdigit():
            continue  # another host's (or an older layout's): not ours to judge
        try:
            os.kill(int(parts[1]), 0)
        except (ProcessLookupError, OverflowError):  # no such process (or no such pid at all)
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside ``final``; on success it replaces ``final`` atomically.

    On any exception the temp directory is removed and ``final`` is left as it was. Replacing an existing
    ``final`` is one atomic exchange where the OS has it (Linux); elsewhere two renames, and a crash
    between them is undone by ``recover_directory`` (run here and by the index loader). Temp folders
    of builders that died (this host, pid gone) are removed here.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(final.parent):
        recover_directory(final)
        _remove_dead_partials(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (pass overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(final), suffix=".partial", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: other users could not read the index
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        with _folder_lock(final.parent):
            if final.exists():
                if _exchange(tmp, final):  # tmp now holds the old version
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    old = final.with_name(f".{final.name}.old")
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(final, old)
                    os.replace(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
