"""One run per output_dir: the main process holds a lock on <output_dir>/.lock; a second run stops in one line."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from accelerate.utils import broadcast_object_list

from cityseg.config.schema import ConfigError

LOCK_FILE = ".lock"
# A restart inside the allocation (slurm/train.sh) or a resume right after a kill may start while the previous
# holder is still being torn down; the kernel drops its lock the moment it dies, so a short wait is enough.
WAIT_S = 5.0
_held: dict[Path, int] = {}  # this process's locks: path -> open descriptor (closing it would release the lock)


class OutputDirBusy(ConfigError):
    """Another live run holds this output_dir (the CLI exits 2)."""


def _holder(lock: Path) -> str:
    try:
        text = lock.read_text().strip()
    except OSError:
        text = ""
    return text or "holder not yet recorded"


def acquire(output_dir: str | Path, wait_s: float = WAIT_S) -> str | None:
    """Lock output_dir for this process; None when held, else who holds it. The lock lives as long as the process
    (or until release()): a run killed by SIGKILL or a lost node leaves no stale lock for its requeue."""
    lock = Path(output_dir).resolve() / LOCK_FILE
    if lock in _held:
        return None
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            # a POSIX record lock (fcntl F_SETLK), not flock: forked loader workers do not inherit it (they would
            # hold an flock for seconds after the main process died), and NFS clients lock it on the server
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):  # e.g. Lustre without -o flock: run on, and say so
                print(f"warning: {lock}: the filesystem does not support locks ({errno.errorcode.get(err.errno)}); "
                      "a second run on this output_dir would not be stopped", file=sys.stderr)
                break
            if time.monotonic() >= deadline:
                os.close(fd)
                return _holder(lock)
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
             .encode())
    _held[lock] = fd
    return None


def release(output_dir: str | Path) -> None:
    """Drop this process's lock (the file stays: removing it would let two runs lock two different files)."""
    fd = _held.pop(Path(output_dir).resolve() / LOCK_FILE, None)
    if fd is not None:
        os.close(fd)


def hold(output_dir: Path, accelerator) -> None:
    """The main process locks output_dir and tells the others; every rank raises OutputDirBusy if it is taken."""
    holder = [None]
    if accelerator.is_main_process:
        holder = [acquire(output_dir)]
    if accelerator.num_processes > 1:
        broadcast_object_list(holder)  # the main process waits at most WAIT_S for the lock before answering
    if holder[0] is not None:
        raise OutputDirBusy(f"{output_dir}: in use by another run ({holder[0]}; {output_dir / LOCK_FILE}): wait "
                            "for it to end or stop it, or choose another output_dir")
