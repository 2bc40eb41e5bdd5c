"""Atomic file writes, once: every file the project writes (checkpoints, cache shards and manifests, results,
exports, the demo world) goes through `atomic_write`, so a crash or a kill never leaves a half-written file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# what open() would give; mkstemp's 0600 would hide shared files (a teacher cache, results) from other users
_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temp path beside `path` to write to (also by libraries that take a path); on success it is fsynced and
    renamed over `path`, on failure removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """`with atomic_write(path) as f:` a file object whose content replaces `path` only when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f
        f.flush()


def write_bytes(path: str, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: str, obj, indent: int = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def torch_save(obj, path: str) -> None:
    import torch

    with atomic_write(path) as f:
        torch.save(obj, f)


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """The sha256 of a file's bytes, read in chunks (cache shards, teacher weights, downloads)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
