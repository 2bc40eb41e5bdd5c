"""WebDataset (tar shard) data: `get_wds_dataset(data, transforms, *, seed, epoch, is_train, floor=False) -> DataInfo`.

Shards
    `--train-data` is a brace pattern (`/data/cc3m/{00000..00331}.tar`); several sources are joined with `::`
    (`/data/cc3m/{00000..00331}.tar::/data/cc12m/{00000..01242}.tar`). A shard is a local path, a `file://` URL,
    a `pipe:` command writing the tar to stdout (`pipe:aws s3 cp s3://b/00000.tar -`) or an fsspec URL
    (`s3://`, `gs://`, `https://`, ...; needs `fsspec` plus the protocol's package, e.g. `s3fs`).

Samples
    Tar members are grouped by key (`00000123.jpg`, `00000123.txt`, `00000123.json` -> one sample) as webdataset
    does. The image is the first of jpg/jpeg/png/webp; the caption is the member whose extension is
    `--wds-caption-key` (default `txt`) or, failing that, that field of the `.json` member (dotted paths allowed,
    e.g. `--wds-caption-key caption`). One decode feeds both student and teacher preprocessing (`make_sample`).

Keys (`batch["key"]`, what a teacher-embedding cache joins on), chosen by `--wds-key-format`:
    `auto` (default): the tar `__key__` with one source, `<source>/<__key__>` with several (source = name of the
    folder holding that source's shards, `src<i>` where two sources share a folder name); `key`: always the bare
    `__key__`; `shard`: `[<source>/]<shard stem>/<__key__>` for datasets whose keys repeat across shards.

Epochs (not resampled)
    Per (seed, epoch) the shard list is permuted; reader g = rank + world_size * worker gets shards g, g + R, ...
    (R = world_size * workers), so no two readers open the same shard in an epoch. Every reader yields exactly
    `num_batches / workers` batches: a reader that runs out starts another pass over its own shards (re-shuffled),
    and one with more data stops early, as open_clip's `with_epoch` does. Samples are shuffled through a
    per-reader buffer (`--wds-shuffle-buffer`) seeded by (seed, epoch, rank, worker); the buffer is flushed at the
    end of each pass so no sample repeats before the reader has seen all of its samples.

Epochs (`--dataset-resampled`)
    Every reader draws shards with replacement (weighted by `--train-data-upsampling-factors`, per shard as in
    open_clip) from a stream seeded by (seed, epoch, start_batch, rank, worker).

Bad data never stops training and never shrinks a batch. `batch["skipped"]` counts problems by reason (since that
    worker's previous batch): `missing_image`, `missing_caption`, `bad_caption`, `corrupt_image` (decode or
    preprocessing failed), `truncated_tar` (tar ends early or has a broken header; counted once per read of the
    shard), `unreadable_shard` (cannot be opened). Per shard: `info.extra["skipped_by_shard"]` accumulates
    `{"<reason>:<shard url>": count}` in the main process, each worker logs its first few skips with shard and key,
    and the end of every epoch logs one line with the shards that had problems. Under `--teacher-cache DIR
    --cache-missing skip` shards the cache does not list are left out up front (logged; none left is an error), and
    a sample the cache lacks is skipped as `not_in_teacher_cache`. A reader whose whole pass over its shards gave
    no usable sample stops with a one-line NoDataError instead of looping.

Exact mid-epoch resume (not resampled)
    Batch b comes from worker b % workers (DataLoader round robin). Each batch carries the number of samples its
    worker has taken from its shuffled stream so far; `info.state_dict()` returns these per-worker
    positions. After `info.load_state_dict(states)` and `info.set_epoch(epoch, start_batch)` each worker
    regenerates its deterministic stream, skips its recorded position (local tars: headers only, no image reads or
    decodes), and the workers are re-labelled so batch `start_batch` comes next: the run continues with exactly the
    samples, in the same order, an uninterrupted run would have produced. Without a matching state
    (`set_epoch(epoch, start_batch)` alone) each worker instead replays its first batches by decoding images (no
    preprocessing) to find how far it got: still exact unless preprocessing (not decoding) rejected a sample.

Checkpoint contract
    `info.state_dict()` -> this rank's small picklable dict {format, resampled, seed, epoch, batch (batches of the epoch
    consumed), rank, world_size, workers, num_shards, batch_size, positions (per worker, int or None)}. Positions
    differ between ranks, so keep one per rank (e.g. `all_gather_object` into a list). `info.load_state_dict(states)` accepts
    that list (indexed by rank), a {rank: dict} mapping or one dict; it is used by the next `set_epoch` whose
    (epoch, start_batch) and set-up match it, and ignored with a warning otherwise (the workers then replay).

Evaluation (`is_train=False`, `data.val_data`)
    Every shard once, split between the DataLoader workers only (not ranks), unshuffled, last batch partial;
    `num_batches` from `--val-num-samples` or sizes.json.
"""

from ...errors import NoDataError
from .dataset import WdsDataset, WdsLoader, get_wds_dataset
from .resume import STATE_FORMAT
from .tar import IMAGE_EXTS, SKIP_REASONS, TarReader, decode_caption
from .urls import check_url_support, dataset_size, expand_sources, make_key, shard_stem, source_names, url_scheme

__all__ = ["IMAGE_EXTS", "SKIP_REASONS", "STATE_FORMAT", "NoDataError", "TarReader", "WdsDataset", "WdsLoader",
           "check_url_support", "dataset_size", "decode_caption", "expand_sources", "get_wds_dataset", "make_key",
           "shard_stem", "source_names", "url_scheme"]
