"""The registry of released checkpoints, as data: `registry.csv` beside this file (every checkpoint the CLIP-KD
README releases) plus the files named by `$CLIP_KD_REGISTRY` (same columns; e.g. a cluster's internal releases)."""

from __future__ import annotations

import csv
import difflib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote, urlsplit

from ..errors import UsageError

SHIPPED_REGISTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "registry.csv")
REGISTRY_ENV = "CLIP_KD_REGISTRY"
COLUMNS = ("name", "arch", "url", "sha256", "role", "teacher", "data", "imagenet_top1", "doubtful", "note")
REQUIRED = ("name", "arch", "url", "role")  # the other columns may be absent from an extra registry file
ROLES = ("teacher", "student", "baseline")
RESERVED_PREFIX = "clipkd-"  # a value with this prefix is always a registry name, never an open_clip tag
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")


@dataclass(frozen=True)
class Checkpoint:
    name: str
    arch: str
    url: str
    role: str
    sha256: str = ""
    teacher: str = ""
    data: str = ""
    imagenet_top1: str = ""  # the published figure as the README prints it (34.90, 72.8)
    doubtful: bool = False
    note: str = ""
    source: str = ""  # the registry file the row came from

    @property
    def file_name(self) -> str:
        """The release file name: the cache, a mirror folder and `download --dir` all store it under this name."""
        return os.path.basename(unquote(urlsplit(self.url).path)) if self.url else ""

    @property
    def top1(self) -> float | None:
        return float(self.imagenet_top1) if self.imagenet_top1 else None

    def refusal(self) -> str | None:
        """Why this checkpoint cannot be fetched, or None."""
        if not self.url:
            return f"it has no download link: {self.note or 'the registry gives no url'}"
        if self.doubtful:
            return f"it is marked doubtful: {self.note or 'see its registry'}"
        return None


def _registry_files() -> tuple[str, ...]:
    extra = [p for p in os.environ.get(REGISTRY_ENV, "").split(os.pathsep) if p.strip()]
    return (SHIPPED_REGISTRY, *extra)


def _parse_row(row: dict, path: str, line: int) -> Checkpoint:
    where = f"{path} line {line}"
    get = {k: (row.get(k) or "").strip() for k in COLUMNS}
    name = get["name"]
    if not _NAME.fullmatch(name) or name.endswith(_WEIGHT_SUFFIXES):
        raise UsageError(f"registry {where}: bad name {name!r} (lower-case letters, digits, '.', '_', '-'; "
                         "not a file name)")
    if not get["arch"]:
        raise UsageError(f"registry {where}: {name} has no arch")
    if get["role"] not in ROLES:
        raise UsageError(f"registry {where}: {name} has role {get['role']!r} (expected {', '.join(ROLES)})")
    arch = get["arch"]
    if arch.endswith(".json") and not os.path.isabs(arch):  # a config beside an extra registry file
        arch = os.path.join(os.path.dirname(os.path.abspath(path)), arch)
    sha = get["sha256"].lower()
    if sha and not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise UsageError(f"registry {where}: {name} has a malformed sha256 {get['sha256']!r}")
    if get["imagenet_top1"]:
        try:
            float(get["imagenet_top1"])
        except ValueError:
            raise UsageError(f"registry {where}: {name} has imagenet_top1 {get['imagenet_top1']!r}, "
                             "not a number") from None
    if get["doubtful"] not in ("", "yes", "no"):
        raise UsageError(f"registry {where}: {name} has doubtful {get['doubtful']!r} (expected yes, no or empty)")
    url = get["url"]
    if url and not (urlsplit(url).scheme in ("http", "https", "file") or os.path.isabs(url)):
        raise UsageError(f"registry {where}: {name} has url {url!r} (expected http(s)://, file:// or an "
                         "absolute path)")
    return Checkpoint(name=name, arch=arch, url=url, role=get["role"], sha256=sha, teacher=get["teacher"],
                      data=get["data"], imagenet_top1=get["imagenet_top1"], doubtful=get["doubtful"] == "yes", note=get["note"],
                      source=path)


def _read_file(path: str) -> list[Checkpoint]:
    if not os.path.isfile(path):
        raise UsageError(f"registry file not found: {path} (from ${REGISTRY_ENV})")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED if c not in header]
            if missing:
                raise UsageError(f"registry {path} lacks the column(s) {', '.join(missing)} (columns: "
                                 f"{','.join(COLUMNS)})")
            return [_parse_row(row, path, i) for i, row in enumerate(reader, start=2)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"cannot read registry {path}: {exc}") from None


def _open_clip_tags() -> set[str]:
    import open_clip

    return {tag for _, tag in open_clip.list_pretrained()}


@lru_cache(maxsize=8)
def _load(files: tuple[str, ...]) -> dict[str, Checkpoint]:
    rows: dict[str, Checkpoint] = {}
    by_file: dict[str, Checkpoint] = {}
    tags = _open_clip_tags()
    for path in files:
        for ckpt in _read_file(path):
            if ckpt.name in rows:
                raise UsageError(f"registry {path}: {ckpt.name} is already defined in {rows[ckpt.name].source}")
            if ckpt.name in tags:
                raise UsageError(f"registry {path}: {ckpt.name} would shadow the open_clip pretrained tag of that "
                                 "name")
            other = by_file.get(ckpt.file_name)
            if ckpt.file_name and other is not None and other.url != ckpt.url:
                raise UsageError(f"registry {path}: {ckpt.name} and {other.name} have different urls with the same "
                                 f"file name {ckpt.file_name} (the cache stores files by that name)")
            rows[ckpt.name] = ckpt
            if ckpt.file_name:
                by_file[ckpt.file_name] = ckpt
    return rows


def load_registry() -> dict[str, Checkpoint]:
    """Every registered checkpoint by name: the shipped registry, then each `$CLIP_KD_REGISTRY` file."""
    return _load(_registry_files())


def lookup(name: str) -> Checkpoint:
    """The registry row `name`; a one-line UsageError with close names otherwise."""
    rows = load_registry()
    if name in rows:
        return rows[name]
    close = difflib.get_close_matches(name, list(rows), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else " (python -m training.pretrained list)"
    raise UsageError(f"unknown released checkpoint '{name}'{hint}")


def is_registry_name(value: str | None) -> bool:
    """A registered name, or one with the reserved prefix that is not a file (so a typo gets close names)."""
    if not value:
        return False
    if value in load_registry():
        return True
    return (value.startswith(RESERVED_PREFIX) and os.sep not in value and not value.endswith(_WEIGHT_SUFFIXES)
            and not os.path.exists(value))
