"""Token ids stored in WebDataset shards, so captions are tokenised once (at conversion), not on every epoch.

`python -m training.data.convert ... --tokenize MODEL` writes `<key>.tok.npy` (int32 [captions, context]: the ids of
the sample's captions, in the order of its `.txt`/list) and `tokens.json` beside the shards: the model, the caption
key the ids belong to, and the ids of fixed probe captions (training.tokenizers.TOKENIZER_PROBES). The WebDataset loader
uses the stored ids only when the student's tokenizer gives the same probe ids (else it refuses, one line) and the
run reads the same caption key; a sample whose stored ids do not match its captions in number is tokenised as usual.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import torch

from ..errors import UsageError
from ..tokenizers import TOKENIZER_PROBES

TOKENS_EXT = "tok.npy"  # tar member suffix: <key>.tok.npy
FINGERPRINT = "tokens.json"


def encode_tokens(ids: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, ids.numpy().astype(np.int32), allow_pickle=False)
    return buf.getvalue()


def decode_tokens(data: bytes) -> torch.Tensor:
    """The stored ids as the tokenizer returns them (int64 [captions, context])."""
    ids = np.load(io.BytesIO(data), allow_pickle=False)
    if ids.ndim != 2 or ids.dtype != np.int32:
        raise ValueError(f"stored token ids have shape {ids.shape} and dtype {ids.dtype}; expected int32 [C, L]")
    return torch.from_numpy(ids.astype(np.int64))


def fingerprint(model: str, tokenizer, caption_key: str = "txt") -> dict:
    return {"model": model, "caption_key": caption_key, "probe_ids": tokenizer(TOKENIZER_PROBES).tolist()}


def stored_token_dirs(shard_paths: list[str | None], tokenizer, caption_key: str) -> set[str]:
    """The shard folders whose stored ids this run may use: their tokens.json matches `tokenizer` and the caption key.

    Raises UsageError (one line) when a folder's ids come from another tokenizer."""
    usable: set[str] = set()
    for folder in {os.path.dirname(p) for p in shard_paths if p is not None}:
        path = os.path.join(folder, FINGERPRINT)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                stored = json.load(f)
            probe_ids = stored["probe_ids"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"cannot read the token fingerprint {path}: {exc}") from exc
        if tokenizer(TOKENIZER_PROBES).tolist() != probe_ids:
            raise UsageError(f"the shards in {folder} hold token ids of the {stored.get('model')} tokenizer, which "
                             f"tokenises differently from this model's: convert again with --tokenize <this model> "
                             f"(or without --tokenize), or delete {path} to tokenise while training")
        if stored.get("caption_key", "txt") == caption_key:
            usable.add(folder)
    return usable
