"""Crash-safe files: written to a temporary file in the same folder, flushed, fsynced and renamed
over the target, so a reader sees the old file or the new one, never half of one. Safetensors
files also carry a checksum of every tensor's bytes in their metadata, so corruption is caught."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def _checksum(tensors: Dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        digest.update(key.encode())
        digest.update(str(t.dtype).encode())
        digest.update(json.dumps(list(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else the usual
    set-and-restore."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_if_written(tmp: str, target: str, folder: bool = False) -> None:
    """Gives ``tmp`` the permissions ``target`` would have had if written in place: its own when
    it exists, else what ``open``/``mkdir`` give under the umask (tempfile makes its files and
    folders private, 0600/0700: a result file, plot or adapter would be unreadable to the group)."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        mode = (0o777 if folder else 0o666) & ~_umask()
    os.chmod(tmp, mode)


def _fsync_folder(folder: str) -> None:
    """Makes a rename in ``folder`` durable (the entry itself, not only the file's bytes)."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path`` to write; on success the file there is fsynced and
    renamed over ``path`` (and the folder fsynced), on failure removed — ``path`` is untouched."""
    if os.path.isdir(path):  # else os.replace's error names the temporary file, not the user's path
        raise IsADirectoryError(f"{path} is a folder; give the path of the file to write")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".hlora-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _as_if_written(tmp, path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_folder(folder)


@contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """Yields a temporary folder beside ``path`` to fill; on success it takes ``path``'s place
    (an older folder there is moved aside first and removed after), on failure it is removed and
    ``path`` is untouched. Between the two renames a crash leaves the old folder as
    ``.hlora-old-*`` beside it: the previous work is never deleted before the new is in place."""
    if os.path.isfile(path):
        raise NotADirectoryError(f"{path} is a file; give the folder to write")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".hlora-new-", dir=parent)
    old = None
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        _as_if_written(tmp, path, folder=True)
        if os.path.lexists(path):
            old = os.path.join(parent, f".hlora-old-{uuid.uuid4().hex}")
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    if old is not None and os.path.islink(old):
        os.unlink(old)  # a symbolic link there was replaced, not followed: the folder it names is kept
    elif old is not None:
        shutil.rmtree(old)
    _fsync_folder(parent)


def save_atomic(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {**metadata, "checksum": _checksum(cpu)}
    with atomic_path(path) as tmp:
        save_file(cpu, tmp, metadata=meta)


def read_text(path: str) -> str:
    """A UTF-8 text file whole (whatever the locale); a file in another encoding (or a binary
    one) is a ValueError naming it, not a bare codec message."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}: not UTF-8 text (byte {raw[err.start]:#04x} on line {line}); "
                         "convert it, e.g. iconv -f latin1 -t utf-8") from None


def read_json(path: str) -> object:
    """A JSON file, its errors naming it (and where in it)."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def write_text_atomic(path: str, text: str) -> None:
    """``text`` as the whole of ``path`` (UTF-8), or ``path`` as it was if anything fails."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json_atomic(path: str, payload: object, default: Callable[[object], object] = str) -> None:
    """``payload`` as indented JSON in ``path``, atomically (objects JSON cannot hold go through
    ``default``)."""
    write_text_atomic(path, json.dumps(payload, indent=1, default=default))


def read_metadata(path: str, kind: str) -> Dict[str, str]:
    """The metadata of a file written by :func:`save_atomic`, checked to be an hlora file of
    ``kind``; no tensor is read (for failing early). FileNotFoundError (or IsADirectoryError) when
    ``path`` is not a file; ValueError when it is not a readable safetensors file of ``kind``."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; give the path of the {kind} file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {err}") from err
    if metadata.get("format") != kind:
        raise ValueError(f"{path} is not an {kind} file (format={metadata.get('format')!r})")
    return metadata


def load_checked(path: str, kind: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and metadata of a file written by :func:`save_atomic` (:func:`read_metadata`'s
    checks, then its checksum: ValueError when it does not match)."""
    metadata = read_metadata(path, kind)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {err}") from err
    if metadata.get("checksum") != _checksum(tensors):
        raise ValueError(f"{path} is corrupted: its checksum does not match its contents")
    return tensors, metadata
