"""One writer per run folder: an exclusive `fcntl.flock` on `<folder>/.lock`, held for the whole
life of a run, resume, replay or eval that writes the folder.

The OS releases a flock when its holder dies, even by kill -9, so no stale lock can wedge a resume;
a lock file left by a killed holder is simply locked again. The holder writes "pid host" into the
file, which a second writer names in its error. `abandon` undoes the lock when the run fails before
its first write (the folder is left exactly as it was, times included); `release` removes the file.
The lock file is never opened through a symlink (it would be truncated outside the folder); one that
is no regular file or cannot be opened is a ValueError, as a held lock is.
"""

import fcntl
import os
import socket
import stat

LOCK_NAME = ".lock"


class FolderLock:
    def __init__(self, folder: str, flag: str = "--output_dir"):
        self.folder, self.flag = folder, flag
        self.path = os.path.join(folder, LOCK_NAME)
        self.fd = None
        self._before = None

    def acquire(self) -> "FolderLock":
        """Take the lock, or raise ValueError naming its holder. Creates the folder if needed."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and not stat.S_ISREG(mode):
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
            raise ValueError(
                f"lock file {self.path} is {kind}: remove it ({self.flag} {self.folder})"
            )
        try:
            return self._acquire()
        except OSError as e:  # e.g. a read-only lock file: one line, the folder as it was
            self._restore_folder_times()
            raise ValueError(f"cannot open the lock file: {e.strerror} ({self.path})") from None

    def _acquire(self) -> "FolderLock":
        folder_existed, created = os.path.isdir(self.folder), []
        parent = self.folder
        # the folders makedirs will create, innermost first
        while parent and not os.path.exists(parent):
            created.append(parent)
            parent = os.path.dirname(parent)
        self._before = {
            "created": created,
            "folder_times": _times(self.folder) if folder_existed else None,
            "file": _read(self.path),
            "file_times": _times(self.path),
        }
        os.makedirs(self.folder, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = (_read(self.path) or b"").decode("utf-8", "replace").split()
                os.close(fd)
                self._restore_folder_times()
                pid, host = (holder + ["?", "?"])[:2]
                raise ValueError(
                    f"output folder is in use by another run: pid {pid} on host {host} holds its "
                    f"lock; wait for it to end or stop it ({self.flag} {self.folder})"
                ) from None
            # a holder that released between our open and flock removed the file: lock the new one
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        return self

    def release(self) -> None:
        """The run is over: remove the file, then let go (a waiter then sees the file gone and
        retries)."""
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def abandon(self) -> None:
        """The run failed before writing anything: put the folder back exactly as it was."""
        if self.fd is None:
            return
        before = self._before
        if before["file"] is None:
            os.remove(self.path)
        else:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, before["file"], 0)
            os.utime(self.path, ns=before["file_times"])
        os.close(self.fd)
        self.fd = None
        try:
            for folder in before["created"]:
                # only those we created, and only while nothing else appeared in them
                os.rmdir(folder)
        except OSError:
            pass
        self._restore_folder_times()

    def _restore_folder_times(self):
        if self._before is not None and self._before["folder_times"] is not None:
            os.utime(self.folder, ns=self._before["folder_times"])


def _read(path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _times(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_atime_ns, st.st_mtime_ns


def hold(folder: str, dist, flag: str = "--output_dir") -> FolderLock:
    """Under torchrun rank 0 takes the lock (an unacquired FolderLock elsewhere: release and abandon
    do
    nothing); every rank learns whether it could, so all of them stop together, rank 0 with the
    line."""
    lock, error = FolderLock(folder, flag), None
    if dist.is_main:
        try:
            lock.acquire()
        except ValueError as e:
            error = e
    if dist.any(error is not None):
        raise error if error is not None else SystemExit(2)
    return lock
