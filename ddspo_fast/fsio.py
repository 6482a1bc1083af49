"""File-system primitives every writer in the library uses: atomic files and directories,
JSONL reading, exclusive locks, and one clear message for a full disk.

Why atomic: a reader (or a resumed writer) must never see a half-written file, whatever
moment the writing process was killed at. Everything is written under a temporary name in
the destination directory, flushed, then renamed into place, and the directory entry is
flushed too.

Why the explicit chmod: ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 entries, so a
renamed temp file would not honour the umask the way ``open()`` does. Outputs are shared
by teams, so they get the mode a plain ``open()`` / ``mkdir()`` would give (0644 / 0755
under the usual umask 022).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Tuple

TMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"  # the file DirLock holds inside the locked directory


class DiskFullError(OSError):
    """No space left on the device while writing a named path."""


class LockedError(RuntimeError):
    """Another process holds the lock on a directory."""


def current_umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file under the current umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` would give a new directory under the current umask."""
    return 0o777 & ~current_umask()


def sha256_file(path) -> str:
    """The sha256 hex digest of a file's bytes, read in 4 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path) -> None:
    """Flush a directory entry (a rename into it) to disk where the OS allows it."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def explain_disk_full(path):
    """Turn ENOSPC (and torch's wrapped form of it) into one message naming ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(e.errno, f"no space left on device while writing {path}") from None
        raise
    except RuntimeError as e:
        # torch.save reports a failed write as RuntimeError ("... inline_container.cc ...",
        # "file write failed"); tell the user what actually happened when the disk is full.
        text = str(e).lower()
        if "no space left" in text or "file write failed" in text or "inline_container" in text:
            raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {path} "
                                f"(or the write failed: {str(e).splitlines()[0]})") from None
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
        # safetensors' Rust writer: SafetensorError("... Os { code: 28, kind: StorageFull ...")
        if _is_disk_full_text(str(e)):
            raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {path}") from None
        raise


def _is_disk_full_text(text: str) -> bool:
    text = text.lower()
    return ("no space left" in text or "storagefull" in text or "os error 28" in text
            or "code: 28," in text or "quota exceeded" in text)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(str(p)).free


def require_free_space(path, need_bytes: int, what: str = "") -> None:
    """Raise ``DiskFullError`` before writing ``path`` when its file system has fewer than
    ``need_bytes`` free (a cheap check that saves a half-written file and names the
    path; pass a lower bound of the size, so a write that fits is never refused)."""
    free = free_bytes(path)
    if free < need_bytes:
        detail = f" ({what} needs at least {_human_bytes(need_bytes)}, {_human_bytes(free)} free)"
        raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {path}{detail}")


def atomic_write(path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, fsync the result, give it the umask's mode, then rename it
    onto ``path``. On any failure the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=TMP_SUFFIX, dir=str(path.parent))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with explain_disk_full(path):
            write(tmp_path)
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp_path, file_mode())
            os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, _write)


def atomic_write_text(path, text: str) -> None:
    def _write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    atomic_write(path, _write)


def atomic_write_json(path, obj: Any, *, indent: int | None = 2, sort_keys: bool = True) -> None:
    """Strict JSON (``allow_nan=False``): a NaN would make the file unreadable to strict
    readers, so it is the caller's job to turn non-finite values into ``None``."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys,
                                       ensure_ascii=False, allow_nan=False) + "\n")


def atomic_write_jsonl(path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n"
                                    for r in rows))


def make_temp_dir(parent, prefix: str) -> Path:
    """A fresh directory inside ``parent`` (same file system, so it can be renamed into
    place) with the mode ``mkdir`` would give it."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=str(parent)))
    os.chmod(tmp, dir_mode())
    return tmp


def publish_dir(tmp, final, *, keep_old: bool = False) -> None:
    """Rename the finished directory ``tmp`` onto ``final``. An existing ``final`` is moved
    aside first and removed only after the new one is in place (or kept as ``final.old``
    with ``keep_old``), so at every instant one complete version exists."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None and not keep_old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final, *, prefix: str | None = None):
    """Yield a temporary directory beside ``final``; on success it replaces ``final``
    (see :func:`publish_dir`), on failure it is removed and ``final`` is untouched."""
    final = Path(final)
    tmp = make_temp_dir(final.parent, prefix or f".tmp-{final.name}-")
    try:
        with explain_disk_full(final):
            yield tmp
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def iter_jsonl(path) -> Iterator[Tuple[int, str, Any]]:
    """Yield ``(line_number, raw_line, parsed_or_exception)`` for non-blank lines.

    Parsing errors (bad JSON, or bytes that are not UTF-8) are yielded, not raised, so the
    caller decides whether a bad line is fatal and can name the file and line either way.
    """
    with open(path, "rb") as f:
        for lineno, raw_bytes in enumerate(f, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, raw_bytes.decode("utf-8", "replace"), ValueError(
                    f"not UTF-8 text ({e.reason} at byte {e.start}); re-save the file as UTF-8")
                continue
            if not raw.strip():
                continue
            try:
                obj: Any = json.loads(raw)
            except json.JSONDecodeError as e:
                obj = e
            yield lineno, raw, obj


class DirLock:
    """An exclusive, advisory lock on a directory (``<dir>/.lock``), held for the life of a
    run. A second process asking for it fails at once, naming the holder. The kernel drops
    the lock when the holder dies, so a killed run never leaves a stale lock behind."""

    def __init__(self, directory, what: str = "directory"):
        self.directory = Path(directory)
        self.what = what
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "DirLock":
        import fcntl

        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise LockedError(f"{self.what} {self.directory} is in use by {holder}; wait for it "
                              f"to finish or use another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _real(path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def overlap(output, input_path) -> str | None:
    """How an output path and an input path overlap: ``"is"``, ``"is inside"`` or
    ``"contains"``; None when they are apart (or the input does not exist here, e.g. a
    hub id). Symlinks are resolved, so a link to the model folder is the model folder."""
    if input_path is None or output is None or not os.path.exists(os.path.expanduser(str(input_path))):
        return None
    out, inp = _real(output), _real(input_path)
    if out == inp:
        return "is"
    if inp in out.parents:
        return "is inside"
    if out in inp.parents:
        return "contains"
    return None


def check_output_apart(output, output_name: str, inputs) -> None:
    """Refuse an output (or scratch) path that is, contains or sits inside an input: a
    run writing, replacing or clearing it would destroy what it reads. ``inputs`` maps a
    name (the flag or field the user set) to a path; None paths are skipped. Raises
    ValueError ``"<output_name>: <output> <is|is inside|contains> <name> <path> ..."``,
    with or without --overwrite: no option makes this safe."""
    items = inputs.items() if hasattr(inputs, "items") else inputs
    for name, path in items:
        rel = overlap(output, path)
        if rel is None:
            continue
        what = {"is": f"is the {name} input {path}",
                "is inside": f"is inside the {name} input {path}",
                "contains": f"contains the {name} input {path}"}[rel]
        raise ValueError(f"{output_name}: {output} {what}; an output must not be, contain or "
                         f"sit inside an input (it would be overwritten), --overwrite or not: "
                         f"choose another {output_name.split()[-1]}")


def check_writable_file(path) -> None:
    """Raise OSError naming ``path`` when a file could not be created there (its folder
    cannot be made or written): checked before a long run whose result goes there."""
    path = Path(path)
    parent = path.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=TMP_SUFFIX, dir=str(parent))
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(tmp)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}: it is a directory")
