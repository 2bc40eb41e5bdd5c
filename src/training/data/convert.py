"""Turn a CSV image-caption dataset (CLIP-KD / open_clip format) into WebDataset shards.

    python -m training.data.convert train.csv --data-root /data/cc3m --out /data/cc3m_wds --samples-per-shard 10000

The CSV is read exactly as `--dataset-type csv` reads it (`training.data.csv.read_csv_table`: same
`--csv-img-key/--csv-caption-key/--csv-separator/--data-root` flags, same defaults). Every sample keeps the key the CSV
loader gives it, `<csv file stem>/<row>` (row = 0-based data row of the CSV), so a teacher-embedding cache made from
the CSV joins the shards too. Shards are `00000.tar, 00001.tar, ...` with `<key>.<jpg|png|webp>`, `<key>.txt` (the
caption) and `<key>.json` ({key, row, filepath, caption}); `sizes.json` maps shard names to sample counts.
Original image bytes are copied (other formats such as BMP/GIF/TIFF are re-encoded as JPEG, quality 95) after a full
decode check. Rows with an empty caption, a missing image or an undecodable image are skipped and listed at the end
(and in `convert_skipped.tsv`). Existing shards are never overwritten unless `--overwrite` is given.
`--tokenize MODEL` also stores each sample's caption token ids (training.data.tokens), so training tokenises once.
Bad input prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import sys
import tarfile
from collections import Counter

from PIL import Image

from training.data.common import as_captions
from training.data.tokens import FINGERPRINT, TOKENS_EXT, encode_tokens, fingerprint
from training.errors import UsageError, run_cli
from training.fileio import atomic_path, write_json, write_text

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SHOW = 10  # skipped rows listed per reason on stdout


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"error: {message} (see python -m training.data.convert --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m training.data.convert",
                                description="Convert a CSV image-caption dataset into WebDataset tar shards.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("csv", help="CSV/TSV file with an image path column and a caption column")
    p.add_argument("--out", required=True, help="output folder for NNNNN.tar shards and sizes.json")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--csv-separator", default="\t", help="column separator (the two characters \\t mean a tab)")
    p.add_argument("--data-root", default=None, help="folder joined to relative image paths")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes reading and checking images (0: in this process)")
    p.add_argument("--tokenize", default=None, metavar="MODEL",
                   help="also store each caption's token ids for MODEL's tokenizer (<key>.tok.npy + tokens.json), so "
                        "training reads them instead of tokenising every epoch")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_image(job: tuple[int, str]) -> tuple[int, str, str | None, bytes | None, str]:
    """(index, status, extension, bytes, detail); status ok | missing_image | corrupt_image."""
    index, path = job
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return index, "missing_image", None, None, "file not found"
    except OSError as e:
        return index, "missing_image", None, None, repr(e)
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
            if fmt not in KEEP_FORMATS:
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="JPEG", quality=95)
                return index, "ok", "jpg", buf.getvalue(), f"re-encoded from {fmt}"
    except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt image
        return index, "corrupt_image", None, None, repr(e)
    return index, "ok", KEEP_FORMATS[fmt], data, ""


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes NNNNN.tar shards (each atomically: a temp file renamed when the shard is complete) and records their
    sizes."""

    def __init__(self, out: str, per_shard: int):
        self.out, self.per_shard = out, per_shard
        self.sizes: dict[str, int] = {}
        self.tf: tarfile.TarFile | None = None
        self._pending = contextlib.ExitStack()  # the open shard's atomic_path
        self.count = 0

    def _close(self) -> None:
        if self.tf is not None:
            self.tf.close()
            self._pending.close()  # renamed into place
            self.sizes[f"{len(self.sizes):05d}.tar"] = self.count
            self.tf, self.count = None, 0

    def abort(self) -> None:
        """Drop the shard being written (its temp file), e.g. when the conversion fails."""
        if self.tf is not None:
            self.tf.close()
            self._pending.__exit__(RuntimeError, RuntimeError("conversion aborted"), None)
            self.tf, self.count = None, 0

    def write(self, key: str, ext: str, image: bytes, caption: str, meta: dict, tokens: bytes | None = None) -> None:
        if self.tf is None:
            self._pending = contextlib.ExitStack()
            tmp = self._pending.enter_context(atomic_path(os.path.join(self.out, f"{len(self.sizes):05d}.tar")))
            self.tf = tarfile.open(tmp, "w")
        _add(self.tf, f"{key}.{ext}", image)
        _add(self.tf, f"{key}.txt", caption.encode("utf-8"))
        _add(self.tf, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        if tokens is not None:
            _add(self.tf, f"{key}.{TOKENS_EXT}", tokens)
        self.count += 1
        if self.count == self.per_shard:
            self._close()

    def finish(self) -> dict[str, int]:
        self._close()
        write_json(os.path.join(self.out, "sizes.json"), self.sizes)
        return self.sizes


def _prepare_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a folder")
    existing = sorted(glob.glob(os.path.join(out, "*.tar")) + glob.glob(os.path.join(out, ".tmp-*.tar"))
                      + glob.glob(os.path.join(out, "sizes.json")) + glob.glob(os.path.join(out, FINGERPRINT)))
    if existing and not overwrite:
        raise UsageError(f"--out {out} already holds shards ({len(existing)} files, e.g. "
                         f"{os.path.basename(existing[0])}); pass --overwrite to replace them")
    os.makedirs(out, exist_ok=True)
    for path in existing:
        os.remove(path)


def caption_tokenizer(model: str):
    """open_clip's tokenizer for a model config (the ones this project registers included); unknown names are
    refused rather than silently given open_clip's default tokenizer."""
    import open_clip

    import training  # noqa: F401  (registers the project's model configs)

    if not model.startswith(("hf-hub:", "local-dir:")) and open_clip.get_model_config(model) is None:
        raise UsageError(f"--tokenize {model}: unknown model (open_clip.list_models() lists the known ones)")
    return open_clip.get_tokenizer(model)


def convert(csv: str, out: str, *, samples_per_shard: int = 10000, csv_img_key: str = "filepath",
            csv_caption_key: str = "title", csv_separator: str = "\t", data_root: str | None = None, workers: int = 0,
            overwrite: bool = False, no_progress: bool = False, tokenize: str | None = None) -> dict:
    """Convert one CSV into shards in `out`; returns the summary `print_summary` shows."""
    from training.data.csv import read_csv_table

    if samples_per_shard < 1:
        raise UsageError("--samples-per-shard must be at least 1")
    if not os.path.isfile(csv):
        raise UsageError(f"CSV file not found: {csv}")
    if data_root and not os.path.isdir(data_root):
        raise UsageError(f"--data-root {data_root} is not a folder")
    sep = csv_separator.encode().decode("unicode_escape") if "\\" in csv_separator else csv_separator
    roots = [data_root] if data_root else []
    paths, captions, keys, dropped = read_csv_table([csv], roots, csv_img_key, csv_caption_key, sep)
    rows = [int(k.rsplit("/", 1)[1]) for k in keys]
    stem = keys[0].rsplit("/", 1)[0]
    total_rows = len(keys) + sum(dropped.values())
    skipped: dict[str, list[tuple[str, str]]] = {"empty_caption": [(f"{stem}/{r}", "")
                                                                   for r in sorted(set(range(total_rows)) - set(rows))]}
    tokenizer = caption_tokenizer(tokenize) if tokenize else None
    _prepare_out(out, overwrite)

    from tqdm import tqdm

    jobs = list(enumerate(paths))
    writer = ShardWriter(out, samples_per_shard)
    notes: Counter = Counter()
    pool = None
    if workers > 0:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(workers)
        results = pool.imap(check_image, jobs, chunksize=16)
    else:
        results = map(check_image, jobs)
    ok = False
    try:
        for i, status, ext, data, detail in tqdm(results, total=len(jobs), desc="convert", unit="img",
                                                  disable=no_progress, file=sys.stderr):
            if status != "ok":
                skipped.setdefault(status, []).append((keys[i], f"{paths[i]}: {detail}"))
                continue
            if detail:
                notes["re-encoded as JPEG"] += 1
            meta = {"key": keys[i], "row": rows[i], "filepath": paths[i], "caption": captions[i]}
            tokens = encode_tokens(tokenizer(as_captions(captions[i]))) if tokenizer is not None else None
            writer.write(keys[i], ext, data, captions[i], meta, tokens)
        ok = True
    finally:
        if pool is not None:
            pool.terminate()
        if not ok:
            writer.abort()
    if not writer.sizes and writer.tf is None:
        raise UsageError(f"no image of {csv} could be read (first: {paths[0]}); check --data-root and "
                         f"--csv-img-key")
    sizes = writer.finish()
    if tokenizer is not None:
        write_json(os.path.join(out, FINGERPRINT), fingerprint(tokenize, tokenizer))
    write_text(os.path.join(out, "convert_skipped.tsv"), "reason\tkey\tdetail\n" + "".join(
        f"{reason}\t{key}\t{detail}\n" for reason, items in skipped.items() for key, detail in items))
    return {"rows": total_rows, "samples": sum(sizes.values()), "shards": sizes,
            "skipped": {k: v for k, v in skipped.items() if v}, "notes": dict(notes)}


def print_summary(summary: dict, out: str) -> None:
    n = len(summary["shards"])
    print(f"wrote {summary['samples']} of {summary['rows']} rows into {n} shards in {out}")
    for reason, items in summary["skipped"].items():
        print(f"skipped {len(items)} ({reason}):")
        for key, detail in items[:_SHOW]:
            print(f"  {key}  {detail}".rstrip())
        if len(items) > _SHOW:
            print(f"  ... {len(items) - _SHOW} more in {os.path.join(out, 'convert_skipped.tsv')}")
    if not summary["skipped"]:
        print("skipped nothing")
    for note, count in summary["notes"].items():
        print(f"{note}: {count}")
    last = f"{n - 1:05d}"
    pattern = os.path.join(out, "00000.tar" if n == 1 else "{00000.." + last + "}.tar")
    print(f"train with: --train-data '{pattern}' (sizes.json gives --train-num-samples {summary['samples']})")


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print_summary(convert(**vars(args)), args.out)
    return 0


def main(argv=None) -> int:
    code = run_cli(run, argv)
    if code:  # bad input exits like the parser's own errors, also when called from Python
        raise SystemExit(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
