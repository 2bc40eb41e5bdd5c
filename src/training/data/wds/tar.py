"""The one tar reader: members of a tar shard (local, file://, pipe: or fsspec URL) grouped into samples by key, as
webdataset does (`00000123.jpg`, `00000123.txt`, `00000123.json` -> one sample), and the one caption decoder.

Both the training stream (`training.data.wds.dataset`) and the teacher-cache builder read shards through
`TarReader`, so they see the same samples, captions and keys.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections import Counter
from typing import Any

from ..transforms import SourceImage
from .urls import local_path, url_scheme

log = logging.getLogger("training.data.wds")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SKIP_REASONS = ("missing_image", "missing_caption", "bad_caption", "corrupt_image", "truncated_tar",
                "unreadable_shard")
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_LOG_FIRST = 5  # log this many skips per reason and reader, then count silently


class _Lazy:
    """A member's bytes left on disk (fast-forward over local shards reads headers only)."""

    __slots__ = ("path", "offset", "size")

    def __init__(self, path: str, offset: int, size: int):
        self.path, self.offset, self.size = path, offset, size


def _open_stream(url: str):
    if url_scheme(url) == "pipe":
        import webdataset

        return webdataset.gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


class TarReader:
    """Reads tar shards into samples, counting problems instead of raising them (one per worker or build task).

    `skipped` counts `"<reason>:<shard url>"`; with `lazy` set, local members are returned as file offsets
    (fast-forward reads headers only) and `load` reads them."""

    def __init__(self):
        self.lazy = False
        self.skipped: Counter = Counter()
        self.logged: Counter = Counter()
        self._handles: dict[str, Any] = {}

    def skip(self, reason: str, url: str, detail: str = "") -> None:
        self.skipped[f"{reason}:{url}"] += 1
        if self.lazy:
            return
        self.logged[reason] += 1
        if self.logged[reason] <= _LOG_FIRST:
            more = " (further ones are only counted)" if self.logged[reason] == _LOG_FIRST else ""
            log.warning("webdataset: skipped %s in %s%s%s", reason, url, f": {detail}" if detail else "", more)

    def load(self, files: dict) -> dict:
        if not any(isinstance(v, _Lazy) for v in files.values()):
            return files
        out = {}
        for ext, value in files.items():
            if isinstance(value, _Lazy):
                f = self._handles.get(value.path)
                if f is None:
                    if len(self._handles) > 8:
                        self.close()
                    f = self._handles[value.path] = open(value.path, "rb")
                f.seek(value.offset)
                value = f.read(value.size)
            out[ext] = value
        return out

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def members(self, url: str):
        """Yield (member name, bytes or _Lazy) of one shard; problems are counted, never raised."""
        path = local_path(url)
        if path is not None and path.endswith((".gz", ".tgz", ".bz2", ".xz")):
            path = None  # compressed: offsets are not file offsets, stream it
        fileobj = tf = None
        yielded = 0
        try:
            try:
                if path is not None:
                    fileobj = open(path, "rb")
                    total = os.fstat(fileobj.fileno()).st_size
                    tf = tarfile.open(fileobj=fileobj, mode="r:")
                else:
                    local = local_path(url)
                    fileobj = open(local, "rb") if local is not None else _open_stream(url)
                    tf = tarfile.open(fileobj=fileobj, mode="r|*")
            except Exception as e:  # noqa: BLE001
                self.skip("unreadable_shard", url, repr(e))
                return
            while True:
                try:
                    member = tf.next()
                    tf.members = []  # tarfile keeps every header otherwise
                    if member is None:
                        if path is not None:  # tarfile stops silently at a broken or cut header
                            fileobj.seek(tf.offset)
                            end = fileobj.read(tarfile.BLOCKSIZE)
                            if len(end) < tarfile.BLOCKSIZE or end.count(0) != len(end):
                                self.skip("truncated_tar", url, f"no end-of-archive marker at byte {tf.offset}")
                        return
                    if not member.isreg():
                        continue
                    if path is not None:
                        if member.offset_data + member.size > total:
                            self.skip("truncated_tar", url, f"{member.name} ends past the end of the file")
                            return
                        if self.lazy:
                            data = _Lazy(path, member.offset_data, member.size)
                        else:
                            fileobj.seek(member.offset_data)
                            data = fileobj.read(member.size)
                    else:
                        data = tf.extractfile(member).read()
                except Exception as e:  # noqa: BLE001
                    self.skip("truncated_tar" if yielded else "unreadable_shard", url, repr(e))
                    return
                yielded += 1
                yield member.name, data
        finally:
            for obj in (tf, fileobj):
                if obj is not None:
                    try:
                        obj.close()
                    except Exception:  # noqa: BLE001,S110 - a failed pipe also complains on close
                        pass

    def samples(self, url: str, shard_index: int):
        """Group one shard's members into raw samples (key, shard index, {extension: bytes or _Lazy})."""
        key, files = None, None
        for name, data in self.members(url):
            base = os.path.basename(name)
            if base.startswith(("__", "._")):
                continue
            m = _KEY_RE.match(name)
            if m is None:
                continue
            prefix, suffix = m.group(1), m.group(2).lower()
            if files is None or prefix != key or suffix in files:
                if files:
                    yield key, shard_index, files
                key, files = prefix, {}
            files[suffix] = data
        if files:
            yield key, shard_index, files

    def decode(self, raw_key: str, files: dict, url: str, caption_key: str):
        """(SourceImage, caption) of one raw sample, or None when it is skipped (and counted)."""
        files = self.load(files)
        ext = next((e for e in IMAGE_EXTS if e in files), None)
        if ext is None:
            self.skip("missing_image", url, raw_key)
            return None
        try:
            caption = decode_caption(files, caption_key)
        except ValueError as e:  # also UnicodeDecodeError
            self.skip("bad_caption", url, repr(e))
            return None
        if caption is None:
            self.skip("missing_caption", url)
            return None
        try:
            return SourceImage(files[ext]), caption  # header read here, pixels when a view is rendered
        except Exception as e:  # noqa: BLE001 - any decode failure is a skipped sample
            self.skip("corrupt_image", url, f"{raw_key}: {e!r}")
            return None


def decode_caption(sample: dict, caption_key: str) -> str | list[str] | None:
    """A sample's caption(s). `caption_key` is one key or a comma list of keys (`txt,syn.txt`), each the member with
    that extension, else that (dotted) field of the sample's `.json` member. A member whose extension ends in `json`
    (`captions.json`), or a JSON field, holding a list of strings gives several captions. Blank captions are dropped.

    One caption: a str; several: a list; none: None. ValueError (UnicodeDecodeError, bad JSON) when one cannot be
    decoded. caption_key '' means caption-less data (image-only students): every sample's caption is ''."""
    if not caption_key:
        return ""
    captions: list[str] = []
    for key in (k.strip() for k in caption_key.split(",")):
        if key in sample:
            raw = sample[key].decode("utf-8")
            value = json.loads(raw) if key.endswith("json") else raw
        elif "json" in sample:
            value = json.loads(sample["json"])
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
        else:
            value = None
        if isinstance(value, list):
            captions += [v.strip() for v in value if isinstance(v, str) and v.strip()]
        elif isinstance(value, str) and value.strip():
            captions.append(value.strip())
    if not captions:
        return None
    return captions[0] if len(captions) == 1 else captions
