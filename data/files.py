"""Atomic writes: the one way this project writes a file or a directory that someone reads later.

A file is written to `<path>.tmp<pid>`, flushed to disk (fsync), given the usual permissions, and
renamed over `<path>`; then the directory is fsynced so that the rename itself survives a power
loss. A reader therefore sees the old file or the new one, never a half-written one. A directory
is built whole at `<path>.tmp` and swapped in by two renames (`<path>` -> `<path>.old`,
`<path>.tmp` -> `<path>`); `recover_dir` finishes or undoes a swap a crash interrupted.

    atomic_write("results.json", text)            # str or bytes
    with atomic_path("best.safetensors") as tmp:   # for writers that take a path (save_file)
        save_file(tensors, tmp)
    with atomic_dir("checkpoint") as tmp:          # a directory of such files
        ...

`check_writes` is the one rule for every path a command writes, checked before its first write.
It lives in data/, the bottom layer, because data/ (k-shot folders, the review snippets), models/
(checkpoints, adapters) and the program all write with it.
"""

import contextlib
import os
import re
import shutil

from . import DataError


def check_writes(writes, reads, where) -> None:
    """Refuse, before anything is written, a command whose output would replace or delete what it
    reads: no path in `writes` (a file, or a folder the command owns whole) may be, hold or lie
    inside a path in `reads` ((what, path) pairs; missing or None paths are skipped), compared by
    real path; and none may be a symlink, which a write would follow out of its folder.
    DataError `<what> (<where>)`: what is e.g. "model", where e.g. "--plot FILE"."""
    for path in map(os.fspath, writes):
        if os.path.islink(path):
            raise DataError(f"{path} is a symlink: a command never writes through one ({where})")
    real = [os.path.realpath(p) for p in writes]
    for what, path in reads:
        if path and os.path.lexists(path):
            other = os.path.realpath(path)
            if any(_within(mine, other) or _within(other, mine) for mine in real):
                kind = "folder" if os.path.isdir(path) else "file"
                raise DataError(
                    f"output overlaps the {what} {kind} {os.fspath(path)}: a command "
                    f"never writes over what it reads ({where})"
                )


def check_file_target(path, where, *, make_parents=False) -> None:
    """Refuse now a file a command writes only at its end: a folder, or one whose folder is
    missing (its nearest existing one with make_parents), no folder or not writable."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"is a folder, not a file ({where})")
    parent = os.path.dirname(os.path.abspath(path))
    while make_parents and not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise DataError(f"no folder {parent} to write it in ({where})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"folder {parent} is not writable ({where})")


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory) -> None:
    """Make renames and creations inside `directory` durable."""
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def temp_path(path) -> str:
    """Where a file is written before its rename (the name `is_temp_of` recognises)."""
    return f"{path}.tmp{os.getpid()}"


def is_temp_of(name: str, own: str) -> bool:
    """Whether `name` is a temporary left by writing `own` (`own.tmp<pid>`, `own.tmp`,
    `own.old`)."""
    return re.fullmatch(re.escape(own) + r"\.(tmp\d*|old)", name) is not None


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path; once the block has written it, it replaces `path` atomically.
    On an exception the temporary file is removed and `path` is untouched."""
    path = os.fspath(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # some writers (safetensors) create owner-only files
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def atomic_write(path, content: str | bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)


def recover_dir(path) -> None:
    """Finish or undo a directory swap a crash interrupted (see the module docstring).
    `<path>` exists: the swap finished, drop the leftovers. Only `<path>.old`: the crash came
    between the renames, so put the old directory back. A `<path>.tmp` is never complete."""
    path = os.fspath(path)
    old, tmp = f"{path}.old", f"{path}.tmp"
    if not os.path.exists(path) and os.path.isdir(old):
        os.replace(old, path)
    for leftover in (old, tmp):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)
    if os.path.isdir(os.path.dirname(path) or "."):
        fsync_dir(os.path.dirname(path))


@contextlib.contextmanager
def atomic_dir(path):
    """Yield an empty temporary directory; once the block has filled it, it replaces `path` whole.
    Every crash point leaves either the old or the new directory, after `recover_dir`."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"not a directory ({path})")
    recover_dir(path)
    tmp, old = f"{path}.tmp", f"{path}.old"
    os.makedirs(tmp)
    try:
        yield tmp
        mask = umask()
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
            _fsync_file(os.path.join(tmp, name))
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
    if os.path.exists(old):
        shutil.rmtree(old)
