"""Every file the package writes goes through here: atomic, umask-respecting, cleaned up on signals.

- Atomic: a file is written under a hidden temporary name beside its target and renamed over it only
  once complete, so a failed or interrupted write leaves the target as it was and no temporary file.
- Permissions: files are created with mode 0o666 and folders with 0o777, minus the user's umask
  (0644 / 0755 by default), as `open()` and `mkdir` do; `tempfile.mkstemp` would make them 0600.
- Signals: during a write, SIGTERM (plain `kill`, `docker stop`, a batch scheduler) runs the same
  cleanup as Ctrl-C: it raises `Terminated` (a SystemExit with code 143, the code SIGTERM gives).
- Preflight: `check_writable` tells before any work whether an output can be created at a path.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Callable, Optional, Union

from .errors import InputError

PathLike = Union[str, os.PathLike]


class Terminated(SystemExit):
    """SIGTERM arrived: unwind (running cleanups) and exit with 143 = 128 + SIGTERM."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_cleans_up():
    """Within this block, SIGTERM raises `Terminated` instead of killing the process outright, so
    `finally` / `except BaseException` cleanups run. Only replaces the default handler (a handler
    that a host such as ComfyUI or the trainer installed is left alone), only in the main thread."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def file_mode() -> int:
    """0o666 minus the process's umask: the mode `open()` gives a new file (0o644 by default)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read the umask is to set it, and set it back
    os.umask(mask)
    return 0o666 & ~mask


def apply_umask(folder: Path) -> None:
    """Give every file under `folder` the umask's mode. Writers that do not honour the umask
    (safetensors' save_file makes 0600 files, and so every `save_pretrained`) are fixed up this way."""
    mode = file_mode()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def new_temporary_file(folder: Path, prefix: str, suffix: str = "") -> Path:
    """Create a new empty file `folder/<prefix><random><suffix>` with the umask's permissions."""
    while True:
        path = Path(folder) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


def new_temporary_folder(folder: Path, prefix: str) -> Path:
    """Create a new empty folder `folder/<prefix><random>` with the umask's permissions."""
    while True:
        path = Path(folder) / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue


def atomic_write(path: PathLike, write: Callable[[Path], None], suffix: str = ".tmp") -> Path:
    """Create `path` by calling `write(temporary_path)` and renaming the result into place.

    Missing parent folders are created. On any failure, Ctrl-C or SIGTERM the temporary file is
    removed and an existing file at `path` is left untouched. Returns `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary: Optional[Path] = None
    with sigterm_cleans_up():
        try:
            temporary = new_temporary_file(path.parent, prefix=f".{path.name}.", suffix=suffix)
            write(temporary)
            os.chmod(temporary, file_mode())  # the writer may have replaced the file (safetensors: 0600)
            os.replace(temporary, path)
        except BaseException:
            if temporary is not None:
                temporary.unlink(missing_ok=True)
            raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 text atomically (see `atomic_write`)."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def atomic_save_safetensors(tensors: dict, path: PathLike, metadata: Optional[dict] = None) -> Path:
    """`safetensors.torch.save_file` atomically (see `atomic_write`)."""
    from safetensors.torch import save_file

    tensors = {key: value.detach().contiguous() for key, value in tensors.items()}
    return atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def check_writable(path: PathLike, what: str, folder: bool = False) -> None:
    """Raise InputError unless a file (`folder=False`) or a folder can be created or replaced at `path`.

    Creates and removes a probe file in the nearest existing folder, so permissions, ACLs and
    read-only mounts are all caught before any work is done. `what` names the option (e.g. "--out").
    """
    path = Path(path).expanduser()
    if path.is_dir() and not folder:
        raise InputError(f"{what} {path}: is a folder; give a file name inside it")
    if path.exists() and not path.is_dir() and folder:
        raise InputError(f"{what} {path}: is a file; give a folder (it is created if missing)")
    nearest = path if folder else path.parent
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise InputError(f"{what} {path}: {nearest} is a file, not a folder; choose another location")
    try:
        new_temporary_file(nearest, prefix=".fastwan-write-check-").unlink()
    except OSError as error:
        raise InputError(f"{what} {path}: cannot write in {nearest} ({error.strerror}). Choose a folder you "
                         "can write to, or change its permissions.") from None
