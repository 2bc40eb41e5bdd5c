"""Exact mid-epoch resume of the WebDataset stream: the per-worker stream positions a checkpoint keeps.

Batch b comes from worker b % workers (DataLoader round robin), and each batch carries the number of samples its
worker has taken from its shuffled stream so far. `stream_state` records these positions with the set-up they hold
for; `resume_positions` gives them back to the workers of a matching set-up (a worker skips its recorded position
reading tar headers only), or None per worker when they must replay by decoding.
"""

from __future__ import annotations

import logging

STATE_FORMAT = "clip-kd-wds/1"

log = logging.getLogger("training.data.wds")


def stream_state(setup: dict, batches_seen: int, positions: list[int | None]) -> dict:
    """This rank's small picklable state: the set-up (format, resampled, seed, epoch, rank, world_size, workers,
    num_shards, batch_size), batches of the epoch consumed, and per-worker positions (int or None)."""
    return {"format": STATE_FORMAT, **setup, "batch": batches_seen, "positions": list(positions)}


def select_state(states, rank: int):
    """This rank's entry of saved states: a list indexed by rank (what a checkpoint gathers), a {rank: dict}
    mapping or one dict."""
    if states is None:
        return None
    if isinstance(states, (list, tuple)):
        return states[rank] if rank < len(states) else None
    if isinstance(states, dict) and "format" not in states:
        return states.get(rank, states.get(str(rank)))
    return states


def resume_positions(state, expected: dict, num_roles: int, epoch: int, start_batch: int) -> list[int | None]:
    """Per-worker positions to skip to when `state` was saved by the set-up `expected` describes; all None (the
    workers replay by decoding) with a warning otherwise."""
    expected = {"format": STATE_FORMAT, **expected}
    if isinstance(state, dict) and all(state.get(k) == v for k, v in expected.items()):
        positions = [p if isinstance(p, int) else None for p in list(state.get("positions") or [])][:num_roles]
        return positions + [None] * (num_roles - len(positions))
    why = "no data state was loaded" if state is None else "the saved data state does not match " + str(
        {k: (state.get(k) if isinstance(state, dict) else None, v) for k, v in expected.items()
         if not isinstance(state, dict) or state.get(k) != v})
    log.warning("webdataset: resuming epoch %d at batch %d: %s; workers replay their first batches by decoding "
                "images (slower, exact unless preprocessing rejected a sample)", epoch, start_batch, why)
    return [None] * num_roles
