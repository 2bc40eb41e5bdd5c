"""Shard URLs: sources joined with `::`, brace expansion, shard names, sample keys and URL support checks.

A shard is a local path, a `file://` URL, a `pipe:` command writing the tar to stdout or an fsspec URL (`s3://`,
`gs://`, `https://`, ...). See `training.data.wds` for the whole picture.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand

from training.errors import UsageError

_PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp",
                      "https": "aiohttp", "az": "adlfs", "abfs": "adlfs", "hf": "huggingface_hub"}


def url_scheme(url: str) -> str:
    """'' for local paths, 'pipe' for pipe: commands, otherwise the URL scheme (file, s3, gs, https, ...)."""
    if url.startswith("pipe:"):
        return "pipe"
    scheme = urlparse(url).scheme
    return "" if len(scheme) <= 1 else scheme  # one letter: a Windows drive


def url_path(url: str) -> str:
    """The path-like part of a shard URL (for pipe: commands, the first token that names a .tar)."""
    scheme = url_scheme(url)
    if scheme == "pipe":
        tokens = [t for t in url[5:].split() if ".tar" in t]
        return url_path(tokens[0]) if tokens else url[5:]
    if scheme == "":
        return url
    return url2pathname(urlparse(url).path) if scheme == "file" else urlparse(url).path


def local_path(url: str) -> str | None:
    scheme = url_scheme(url)
    if scheme == "":
        return url
    if scheme == "file":
        return url2pathname(urlparse(url).path)
    return None


def shard_stem(url: str) -> str:
    base = os.path.basename(url_path(url).rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def expand_sources(spec: str) -> list[list[str]]:
    """'a/{0..2}.tar::b/{0..1}.tar' -> [[a/0.tar, a/1.tar, a/2.tar], [b/0.tar, b/1.tar]]."""
    sources = [s.strip() for s in spec.split("::") if s.strip()]
    if not sources:
        raise UsageError(f"no shards in --train-data/--val-data {spec!r}")
    return [list(braceexpand.braceexpand(s)) for s in sources]


def source_names(sources: list[list[str]]) -> list[str]:
    """Key prefixes of the sources: the folder name of each source's first shard (src<i> when they collide)."""
    names = [os.path.basename(os.path.dirname(url_path(urls[0]).rstrip("/"))) or f"src{i}"
             for i, urls in enumerate(sources)]
    return [n if names.count(n) == 1 else f"src{i}" for i, n in enumerate(names)]


def make_key(raw_key: str, url: str, source_name: str | None, key_format: str) -> str:
    """The stable sample key of tar `__key__` raw_key read from shard url (see module docstring)."""
    key = raw_key
    if key_format == "shard":
        key = f"{shard_stem(url)}/{key}"
    if key_format != "key" and source_name is not None:
        key = f"{source_name}/{key}"
    return key


def parse_upsampling_factors(value, num_sources: int) -> list[float] | None:
    if value in (None, ""):
        return None
    parts = value.split("::") if isinstance(value, str) else list(value)
    try:
        factors = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"--train-data-upsampling-factors {value!r}: expected numbers joined with '::'") from None
    if len(factors) != num_sources:
        raise UsageError(f"--train-data-upsampling-factors has {len(factors)} values but --train-data has "
                         f"{num_sources} '::'-joined sources")
    if any(f <= 0 or not math.isfinite(f) for f in factors):
        raise UsageError("--train-data-upsampling-factors must be positive")
    return factors


def check_url_support(urls: list[str]) -> None:
    """Fail early, with what to install, when a shard URL needs a package that is missing."""
    for scheme in sorted({url_scheme(u) for u in urls} - {"", "file", "pipe"}):
        package = _PROTOCOL_PACKAGES.get(scheme, f"the fsspec implementation of {scheme}://")
        try:
            import fsspec
        except ImportError:
            raise UsageError(f"{scheme}:// shards need fsspec and {package} (pip install fsspec {package}, or "
                             f"pip install 'clip-kd[remote]'); or use a pipe: URL such as "
                             f"'pipe:aws s3 cp s3://bucket/00000.tar -'") from None
        try:
            fsspec.get_filesystem_class(scheme)
            if scheme in ("http", "https"):
                import aiohttp  # noqa: F401  (fsspec's http filesystem imports it lazily)
        except (ImportError, ValueError) as e:
            raise UsageError(f"cannot read {scheme}:// shards: {e} (pip install {package}); or use a pipe: URL "
                             f"such as 'pipe:curl -sfL URL'") from None


def read_json_url(url: str):
    local = local_path(url)
    if local is not None:
        if not os.path.exists(local):
            return None
        with open(local) as f:
            return json.load(f)
    if url_scheme(url) == "pipe":
        return None
    try:
        import fsspec

        with fsspec.open(url, "r") as f:
            return json.load(f)
    except Exception:  # noqa: BLE001 - sizes.json is optional
        return None


def dataset_size(sources: list[list[str]]) -> int | None:
    """Sum of sizes.json entries ({shard basename: count}) beside each source's shards; None if any is unknown."""
    total = 0
    cache: dict[str, Any] = {}
    for urls in sources:
        for url in urls:
            path = url_path(url)
            folder = os.path.dirname(path)
            if url_scheme(url) not in ("", "file", "pipe"):
                folder = url[: len(url) - len(os.path.basename(path))].rstrip("/")
            if folder not in cache:
                sizes_url = (folder + "/sizes.json") if folder else "sizes.json"
                cache[folder] = read_json_url(sizes_url)
            sizes = cache[folder]
            name = os.path.basename(path)
            if not isinstance(sizes, dict) or name not in sizes:
                return None
            total += int(sizes[name])
    return total
