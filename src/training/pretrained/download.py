"""Fetching a registered checkpoint: from a mirror folder in place, or over HTTP into the cache.

An HTTP transfer writes `<final>.part` beside the final file and resumes it with a Range request (within a call,
up to `attempts` times, and across calls); the finished part is checked against the registry's sha256 when it
records one and only then renamed to the final name through `fileio.atomic_path`, so the final name never holds a
partial or unchecked file. A lock file beside it lets the ranks of one job share a download.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
from urllib.parse import unquote, urlsplit

from ..errors import UsageError
from ..fileio import atomic_path, atomic_write, file_sha256
from .registry import Checkpoint

CACHE_ENV = "CLIP_KD_CACHE"
MIRROR_ENV = "CLIP_KD_MIRROR"
RELEASE_BASE = "https://github.com/winycg/CLIP-KD/releases/download/CLIP-KDv0.1/"
CHUNK = 1 << 20


def cache_dir() -> str:
    """`$CLIP_KD_CACHE`, else `$XDG_CACHE_HOME/clip-kd`, else `~/.cache/clip-kd`."""
    if os.environ.get(CACHE_ENV):
        return os.path.expanduser(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "clip-kd")


def _local_path(location: str) -> str | None:
    """The file path of a file:// URL or a plain path; None for http(s)."""
    parts = urlsplit(location)
    if parts.scheme in ("http", "https"):
        return None
    return unquote(parts.path) if parts.scheme == "file" else os.path.expanduser(location)


def source_of(ckpt: Checkpoint) -> str:
    """Where `ckpt` is fetched from: `$CLIP_KD_MIRROR` (a folder or an http(s) base holding the files by their
    release file names) when set, else the registry's URL."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return ckpt.url
    if _local_path(mirror) is None:
        return mirror.rstrip("/") + "/" + ckpt.file_name
    return os.path.join(_local_path(mirror), ckpt.file_name)


def _check_sha256(ckpt: Checkpoint, path: str, delete: bool) -> None:
    if not ckpt.sha256:
        return
    got = file_sha256(path)
    if got != ckpt.sha256:
        if delete:
            os.remove(path)
        raise UsageError(f"sha256 mismatch for {ckpt.name}: expected {ckpt.sha256}, got {got}"
                         + ("; the download was deleted" if delete else f" ({path})"))


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock on `<path>.lock`: the ranks of a job (or two jobs) wait for one download."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def fetch(ckpt: Checkpoint, dest_dir: str | None = None, *, timeout: float = 60.0, attempts: int = 3,
          retry_wait: float = 1.0, progress: bool = True, allow_doubtful: bool = False) -> str:
    """The local file of `ckpt`, fetched once. A mirror folder's file is used in place unless `dest_dir` is given
    (then it is copied there); an HTTP source is downloaded into `dest_dir` (default: the cache)."""
    reason = ckpt.refusal()
    if reason and not (allow_doubtful and ckpt.url):
        raise UsageError(f"refusing {ckpt.name}: {reason}")
    source = source_of(ckpt)
    local = _local_path(source)
    if local is not None:
        if not os.path.isfile(local):
            where = f"the mirror folder ${MIRROR_ENV}" if os.environ.get(MIRROR_ENV, "").strip() else "its registry"
            raise UsageError(f"{ckpt.name}: {local} not found (from {where})")
        _check_sha256(ckpt, local, delete=False)  # never deletes a mirror's own file
        if dest_dir is None:
            return local
        final = os.path.join(dest_dir, ckpt.file_name)
        if not os.path.isfile(final):
            with atomic_write(final) as out, open(local, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
        return final
    final = os.path.join(dest_dir or cache_dir(), ckpt.file_name)
    if os.path.isfile(final):
        return final
    with _locked(final):
        if not os.path.isfile(final):  # another rank may have finished it while this one waited
            http_download(source, final, ckpt, timeout=timeout, attempts=attempts, retry_wait=retry_wait,
                          progress=progress)
            # safe to drop now: a waiter on it finds the file once it gets the lock, a newcomer sees the file first;
            # a failed download keeps it, so a waiter and a newcomer cannot both resume the same part
            os.remove(final + ".lock")
    return final


def _describe(exc: Exception, url: str, timeout: float) -> str:
    import urllib3

    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return f"timed out: no data from {url} for {timeout:g}s"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # before its base class ConnectTimeoutError
        return f"cannot connect to {url}: {' '.join(str(exc).split(': ')[-1].split())}"
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return f"timed out connecting to {url} ({timeout:g}s)"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return f"the connection was cut: {' '.join(str(exc).split())}"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of a Content-Range header such as `bytes 100-199/200` or `bytes */200`."""
    m = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not m:
        return None, None
    start, total = m.groups()
    return (int(start) if start is not None else None), (int(total) if total != "*" else None)


def http_download(url: str, final: str, ckpt: Checkpoint, *, timeout: float = 60.0, attempts: int = 3,
                  retry_wait: float = 1.0, progress: bool = True) -> None:
    """Download `url` to `final` through `<final>.part` (resumed with HTTP Range), then check and rename it."""
    import urllib3
    from tqdm.auto import tqdm

    part = final + ".part"
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=timeout, read=timeout),
                               retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=10))
    last_error = "no attempt made"
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(retry_wait * attempt)
        have = os.path.getsize(part) if os.path.isfile(part) else 0
        got_bytes, total = have, None
        try:
            resp = http.request("GET", url, headers={"Range": f"bytes={have}-"} if have else {},
                                preload_content=False, redirect=True,
                                enforce_content_length=False)  # keep a cut body's bytes; the size is checked below
        except urllib3.exceptions.HTTPError as exc:
            last_error = _describe(exc, url, timeout)
            continue
        try:
            if resp.status == 404:
                raise UsageError(f"{ckpt.name}: {url} was not found (HTTP 404)")
            if resp.status == 416 and have:  # the part already holds the whole file, or is longer than it
                _, total = _content_range(resp.headers.get("Content-Range"))
                if total == have:
                    break
                os.remove(part)
                last_error = f"the partial file {part} did not match the server's file; restarted"
                continue
            if resp.status == 206:
                start, total = _content_range(resp.headers.get("Content-Range"))
                if start != have:
                    raise UsageError(f"{ckpt.name}: {url} answered a resume from byte {have} with "
                                     f"Content-Range {resp.headers.get('Content-Range')!r}")
                mode = "ab"
            elif resp.status == 200:  # the server ignored the Range header: start again
                length = resp.headers.get("Content-Length")
                total, have, mode = (int(length) if length and length.isdigit() else None), 0, "wb"
            elif resp.status >= 500:
                last_error = f"{url} answered HTTP {resp.status} {resp.reason or ''}".strip()
                continue
            else:
                raise UsageError(f"{ckpt.name}: {url} answered HTTP {resp.status} {resp.reason or ''}".strip())
            got_bytes = have
            with open(part, mode) as out, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                               unit_divisor=1024, desc=ckpt.file_name, disable=not progress,
                                               leave=False) as bar:
                for chunk in resp.stream(CHUNK, decode_content=False):
                    out.write(chunk)
                    got_bytes += len(chunk)
                    bar.update(len(chunk))
            if total is not None and got_bytes != total:
                last_error = f"truncated body: got {got_bytes} of {total} bytes"
                continue
            break
        except urllib3.exceptions.HTTPError as exc:
            last_error = _describe(exc, url, timeout)
            if isinstance(exc, urllib3.exceptions.ProtocolError) and total is not None:
                last_error = f"truncated body: the connection was cut after {got_bytes} of {total} bytes"
            continue
        finally:
            resp.release_conn()
    else:
        kept = f"; the partial download is kept at {part} and the next try resumes it" if os.path.isfile(part) else ""
        raise UsageError(f"cannot download {ckpt.name} from {url} ({attempts} attempt(s)): {last_error}{kept}")
    _check_sha256(ckpt, part, delete=True)
    with atomic_path(final) as tmp:
        os.replace(part, tmp)  # atomic_path fsyncs it and renames it to the final name
    logging.info("downloaded %s to %s", ckpt.name, final)
