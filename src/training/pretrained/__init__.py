"""Released checkpoints by name: the registry (`registry.csv`, plus `$CLIP_KD_REGISTRY` files), the downloader,
and `resolve`, the one place a `--pretrained` / `--teacher-pretrained` value becomes a local file.

    python -m training.pretrained list
    python -m training.pretrained download clipkd-vit-t-16-kd-vit-b-16-cc3m12m [--dir DIR]

Environment: `$CLIP_KD_CACHE` (download folder; default `$XDG_CACHE_HOME/clip-kd` or `~/.cache/clip-kd`),
`$CLIP_KD_MIRROR` (a folder or an http(s) base URL holding the files by their release file names, used instead of
the GitHub release URLs), `$CLIP_KD_REGISTRY` (extra registry files with the same columns, `:`-separated).
"""

from __future__ import annotations

import logging
import os

from ..errors import UsageError
from .download import CACHE_ENV, MIRROR_ENV, cache_dir, fetch, source_of
from .registry import REGISTRY_ENV, Checkpoint, is_registry_name, load_registry, lookup

__all__ = ["CACHE_ENV", "MIRROR_ENV", "REGISTRY_ENV", "Checkpoint", "cache_dir", "download", "fetch",
           "is_registry_name", "load_registry", "lookup", "resolve", "source_of"]


def download(name: str, dest_dir: str | None = None, **options) -> str:
    """Fetch the registered checkpoint `name` (see `fetch` for the options); returns its local path."""
    return fetch(lookup(name), dest_dir, **options)


def _arch_matches(registered: str, arch: str) -> bool:
    # create_clip knows a JSON config by its file stem, as open_clip registers it
    return arch in (registered, os.path.splitext(os.path.basename(registered))[0])


def resolve(value: str | None, arch: str | None = None) -> str | None:
    """A registry name -> its local file (downloaded into the cache once); any other value (an open_clip tag, a
    path, empty) unchanged. With `arch`, a checkpoint registered for another architecture is refused."""
    if not value or not is_registry_name(value):
        return value
    ckpt = lookup(value)
    if arch is not None and not _arch_matches(ckpt.arch, arch):
        raise UsageError(f"{value} is a {ckpt.arch} checkpoint, not a {arch} one")
    path = fetch(ckpt)
    logging.info("pretrained %s: %s", value, path)
    return path
