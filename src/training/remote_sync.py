"""--remote-sync URL: the run folder copied to any fsspec file system (s3://, gs://, a mounted path, ...), as
open_clip_train's remote sync does: <URL>/<name>/... mirrors <logs>/<name>/...

Rank 0 copies the files that are new or changed (size or mtime) since its last copy, at most every
--remote-sync-frequency seconds (the trainer asks after each checkpoint) and once more at the end. open_clip shells
out to `aws s3 sync` for --remote-sync-protocol s3; here both protocols go through fsspec (s3 needs s3fs).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time

from .config import LoggingConfig
from .errors import UsageError, first_line


def _filesystem(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise UsageError(f"--remote-sync {url}: {first_line(exc)}") from exc


def check_remote(config: LoggingConfig) -> None:
    """Start-up checks: fsspec present, the protocol's file system importable, a run folder to copy."""
    if importlib.util.find_spec("fsspec") is None:
        raise UsageError("--remote-sync needs fsspec: pip install -e '.[remote]'")
    if not config.logs:
        raise UsageError("--remote-sync copies the run folder, and --logs '' writes none")
    if config.remote_sync_protocol == "s3" and not config.remote_sync.startswith("s3://"):
        raise UsageError(f"--remote-sync-protocol s3 needs an s3:// URL, got {config.remote_sync!r} (use "
                         "--remote-sync-protocol fsspec for other file systems)")
    _filesystem(config.remote_sync)  # an unknown protocol or a missing driver (s3fs, gcsfs) fails now


class RemoteSync:
    def __init__(self, config: LoggingConfig, run_dir: str, enabled: bool):
        self.enabled = enabled and bool(config.remote_sync) and bool(run_dir)
        self.run_dir, self.frequency = run_dir, config.remote_sync_frequency
        self.last = time.monotonic()
        self.copied: dict[str, tuple[int, int]] = {}
        if self.enabled:
            self.fs, root = _filesystem(config.remote_sync)
            self.root = root.rstrip("/") + "/" + os.path.basename(run_dir.rstrip("/"))

    def maybe_sync(self) -> None:
        if self.enabled and time.monotonic() - self.last >= self.frequency:
            self.sync()

    def sync(self) -> int:
        """Copy what changed; the number of files copied. A failure is logged, never fatal (as open_clip)."""
        if not self.enabled:
            return 0
        self.last = time.monotonic()
        count = 0
        try:
            for folder, _, names in os.walk(self.run_dir):
                for name in names:
                    path = os.path.join(folder, name)
                    st = os.stat(path)
                    if self.copied.get(path) == (st.st_size, st.st_mtime_ns):
                        continue
                    rel = os.path.relpath(path, self.run_dir).replace(os.sep, "/")
                    target = f"{self.root}/{rel}"
                    self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                    self.fs.put_file(path, target)
                    self.copied[path] = (st.st_size, st.st_mtime_ns)
                    count += 1
        except OSError as exc:
            logging.warning("--remote-sync to %s failed: %s (retried at the next sync)", self.root, first_line(exc))
            return count
        logging.info("remote sync: %d file(s) copied to %s", count, self.root)
        return count
