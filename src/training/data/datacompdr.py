"""Apple's DataCompDR shard layout, read as it is (`--datacompdr-teachers D1,D2,...`): training without conversion.

A DataCompDR sample (WebDataset members of one key) holds `url.txt` (the image URL), `syn.json`
(`{"syn_text": [synthetic captions]}`), `paug.json` (`{"param_aug": [one dict of augmentation parameters per
stored augmentation]}`, the list possibly JSON-encoded as a string), `npz` (`image_emb` [A, ΣD]: the teachers'
embedding of each augmentation, `text_emb` [1 + S, ΣD]: of the ground-truth caption, then of each synthetic one) and
`json`. DataCompDR ships no images: the user joins each sample's `jpg` (and its ground-truth `txt`) from DataComp,
so a training shard also holds those.

Per sample and epoch, one stored augmentation is drawn from (seed, epoch, key) and replayed on the image exactly as
the teacher saw it, beside that augmentation's stored image embedding; the captions are [ground truth] + synthetic,
and `--captions-per-step 2` pairs the ground truth with one drawn synthetic caption (MobileCLIP's form).

Replayed parameters: `random_resized_crop` ([top, left, height, width] in source pixels) and
`random_horizontal_flip` (a bool). A parameter-free step (`to_rgb`, `to_tensor`, `normalize`, `uint8`,
`center_crop` after no resize) needs nothing. Any other augmentation with parameters (`rand_augment`, `resize`,
`random_crop`, `random_erase`, `mixup`, `cutmix`) is not replayed: a shard that needs one is refused with one line,
never trained on as if it had not been applied. Embedding members are re-normalised one by one (`--datacompdr-teachers`
gives their widths); the teachers' logit scales are not stored in the shards, so `--teacher-logit-scales` gives them.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from .transforms import ViewParams

REPLAYED = ("random_resized_crop", "random_horizontal_flip")
PARAMETER_FREE = ("to_rgb", "to_tensor", "normalize", "uint8", "center_crop")
SKIP_REASON = "bad_datacompdr_sample"


class DataCompDRError(UsageError):
    """A DataCompDR shard that needs an augmentation this loader does not replay."""


class BadSample(ValueError):
    """A malformed DataCompDR sample: skipped and counted like a corrupt image."""

    skip_reason = SKIP_REASON


def parse_widths(text: str | None) -> list[int] | None:
    """'768,768' -> [768, 768] (--datacompdr-teachers)."""
    if text is None or not str(text).strip():
        return None
    try:
        widths = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise UsageError(f"--datacompdr-teachers '{text}': expected comma-separated embedding widths, one per "
                         "teacher (e.g. 768,768)") from None
    if not widths or min(widths) < 1:
        raise UsageError(f"--datacompdr-teachers '{text}': widths must be positive")
    return widths


def _json(files: dict, ext: str):
    if ext not in files:
        raise BadSample(f"no {ext} member")
    try:
        return json.loads(files[ext])
    except ValueError as exc:
        raise BadSample(f"{ext} is not JSON ({exc})") from None


def views_of(param_aug: list, url: str) -> list[ViewParams]:
    """The stored augmentations as crop boxes + flips; refuses (one line) an augmentation that is not replayed."""
    views = []
    for params in param_aug:
        if not isinstance(params, dict) or "random_resized_crop" not in params:
            raise BadSample("an augmentation without random_resized_crop parameters")
        for name, value in params.items():
            if name in REPLAYED or name in PARAMETER_FREE or value is None or value == [] or value == ():
                continue
            raise DataCompDRError(f"DataCompDR shard {url} needs the augmentation '{name}' (parameters {value!r}), "
                                  f"which is not replayed (replayed: {', '.join(REPLAYED)}): training on it would "
                                  "pair images with embeddings of differently augmented views")
        crop = params["random_resized_crop"]
        if not (isinstance(crop, (list, tuple)) and len(crop) == 4):
            raise BadSample(f"random_resized_crop parameters {crop!r} are not [top, left, height, width]")
        top, left, height, width = (int(v) for v in crop)
        views.append(ViewParams(top, left, height, width, bool(params.get("random_horizontal_flip") or False)))
    return views


def _members(x: np.ndarray, widths: Sequence[int]) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x, dtype=np.float32))
    return torch.cat([F.normalize(part, dim=-1) for part in t.split(list(widths), dim=-1)], dim=-1)


def parse_sample(files: dict, url: str, widths: Sequence[int]) -> dict:
    """{"captions": [ground truth] + synthetic, "views": [ViewParams], "image_emb" [A, ΣD], "text_emb" [1+S, ΣD]}."""
    if "txt" not in files:
        raise BadSample("no txt member (the ground-truth caption joined from DataComp)")
    gt = files["txt"].decode("utf-8").strip()
    syn = _json(files, "syn.json")
    syn = syn.get("syn_text", []) if isinstance(syn, dict) else syn
    paug = _json(files, "paug.json")
    paug = paug.get("param_aug") if isinstance(paug, dict) else paug
    if isinstance(paug, str):  # DataCompDR stores the list JSON-encoded
        try:
            paug = json.loads(paug)
        except ValueError as exc:
            raise BadSample(f"param_aug is not JSON ({exc})") from None
    if not isinstance(paug, list) or not paug:
        raise BadSample("paug.json holds no param_aug list")
    if "npz" not in files:
        raise BadSample("no npz member")
    try:
        with np.load(io.BytesIO(files["npz"]), allow_pickle=False) as npz:
            image_emb, text_emb = npz["image_emb"], npz["text_emb"]
    except (ValueError, KeyError, OSError) as exc:
        raise BadSample(f"npz unreadable ({exc})") from None
    views = views_of(paug, url)
    if not (isinstance(syn, list) and all(isinstance(s, str) for s in syn)) or not gt:
        raise BadSample("captions: an empty txt or a syn_text that is not a list of strings")
    total = sum(widths)
    if image_emb.shape != (len(views), total) or text_emb.shape != (1 + len(syn), total):
        raise BadSample(f"npz shapes image_emb {image_emb.shape}, text_emb {text_emb.shape} do not match "
                        f"{len(views)} augmentations, 1 + {len(syn)} captions and widths {list(widths)}")
    return {"captions": [gt, *syn], "views": views, "image_emb": _members(image_emb, widths),
            "text_emb": _members(text_emb, widths)}


def draw(sample: dict, per_step: int, rng: random.Random, caption_rng: random.Random) -> tuple[dict, list[int]]:
    """(the teacher entry make_sample replays, the caption indices) for one epoch's draw: an augmentation from the
    sample RNG; the captions from the caption RNG: one of all (per_step 1), or the ground truth plus one synthetic."""
    k = rng.randrange(len(sample["views"]))
    n_syn = len(sample["captions"]) - 1
    if per_step == 1:
        chosen = [caption_rng.randrange(1 + n_syn)]
    else:
        chosen = [0, 1 + caption_rng.randrange(n_syn) if n_syn else 0]
    entry = {"view": sample["views"][k], "teacher_image_emb": sample["image_emb"][k],
             "teacher_view_index": torch.tensor(k, dtype=torch.long)}
    for i, c in enumerate(chosen):
        entry["teacher_text_emb" + ("" if i == 0 else f"_{i + 1}")] = sample["text_emb"][c]
    return entry, chosen
