"""One training process per run directory: a lock file holding the PID of the run that writes there."""

from __future__ import annotations

import os
import socket
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: the PID in the file decides (a dead process's lock is taken over)
    fcntl = None

LOCK_FILE = "run.lock"


class RunInUse(OSError):
    """Another live process is training into the same run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or we cannot tell: assume it is alive)
    return True


def _holder(path: Path) -> str:
    """'PID 123 on host' from a lock file's text, for messages."""
    try:
        pid, _, host = path.read_text().strip().partition(" ")
    except OSError:
        return "unknown PID"
    return f"PID {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


class RunLock:
    """Held while a run trains into `run_dir`: `run_dir`/run.lock holds '<pid> <host>'.

    With fcntl (Linux, macOS) the file is also locked with flock, which the system releases when the process
    dies, however it dies: a lock file left by a dead process is simply taken over. Without fcntl a file whose
    PID is not a live process on this host is taken over. Entering raises RunInUse naming the holder.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def _refuse(self) -> RunInUse:
        return RunInUse(f"another nmsparse run ({_holder(self.path)}) is training into {self.path.parent}: wait for "
                        f"it to finish or stop it, or use another --out (its lock file is {self.path})")

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()} {socket.gethostname()}\n"
        if fcntl is None:
            self._acquire_by_pid(me)
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse() from None
            try:  # the holder before us may have removed the file after we opened it: lock the one on disk
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, me.encode())
        self._fd = fd

    def _acquire_by_pid(self, me: str) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            pid, _, host = self.path.read_text().strip().partition(" ")
            if pid.isdigit() and (host != socket.gethostname() or _pid_alive(int(pid))) and int(pid) != os.getpid():
                raise self._refuse() from None
            self.path.unlink(missing_ok=True)  # stale: its process is gone
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        os.write(fd, me.encode())
        os.close(fd)

    def release(self) -> None:
        if fcntl is None:
            self.path.unlink(missing_ok=True)
            return
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: a waiting process re-checks the inode
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
