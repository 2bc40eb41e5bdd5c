"""Progress bars (tqdm) for training steps and evaluation batches, safe for terminals and for CI logs alike.

The mode is picked once per process (`progress_mode()`):
- "bar": a live tqdm bar on stderr, redrawn in place; chosen when stderr is a terminal;
- "lines": when stderr is not a terminal (a CI log, a file, a pipe): one plain newline-terminated status line at
  most every `LINE_INTERVAL_S` seconds (and one at the end), so a log never fills with carriage returns;
- "off": nothing.
`CLIP_KD_PROGRESS=bar|lines|off` overrides the detection (e.g. `lines` for a parent process that forwards a
child's stderr). Only the main process of a distributed run shows progress (`enabled=`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from tqdm import tqdm

ENV_VAR = "CLIP_KD_PROGRESS"
MODES = ("bar", "lines", "off")
LINE_INTERVAL_S = 30.0  # "lines" mode: at most one status line per bar this often
LINE_DELAY_S = 2.0  # "lines" mode, training: no line for a run that ends (or fails) sooner, so a bad run prints its error only
POSTFIX_INTERVAL_S = 0.5  # how often the training bar reads the loss (a device sync on GPU)


def progress_mode() -> str:
    """"bar", "lines" or "off": $CLIP_KD_PROGRESS if set, else "bar" on a terminal and "lines" otherwise."""
    mode = os.environ.get(ENV_VAR, "").strip().lower()
    if mode in MODES:
        return mode
    stream = sys.stderr
    return "bar" if stream is not None and hasattr(stream, "isatty") and stream.isatty() else "lines"


class _LineStream:
    """A file for tqdm that turns each in-place redraw ("\\r" + status) into one newline-terminated line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").replace("\x1b[A", "")
        if text.strip():
            self.stream.write(text if text.endswith("\n") else text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it", leave: bool = True,
        enabled: bool = True, initial: int = 0, delay: float = 0.0) -> tqdm:
    """A tqdm bar in this process's mode (disabled when `enabled` is False or the mode is "off"); in "lines" mode
    nothing is written before `delay` seconds."""
    mode = progress_mode() if enabled else "off"
    kwargs = {}
    if mode == "lines":
        kwargs = {"file": _LineStream(sys.stderr), "mininterval": LINE_INTERVAL_S, "maxinterval": LINE_INTERVAL_S,
                  "ascii": True, "ncols": 100, "delay": delay}
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, initial=initial,
                disable=mode == "off", dynamic_ncols=mode == "bar", **kwargs)


def iterate(iterable, *, desc: str, unit: str = "batch", total: int | None = None, enabled: bool = True):
    """`iterable` wrapped in a transient bar (evaluation batches); the bar is removed when done in "bar" mode."""
    mode = progress_mode() if enabled else "off"
    if total is None:
        try:
            total = len(iterable)
        except TypeError:  # an IterableDataset's loader (WebDataset shards) has no length
            total = None
    with bar(iterable, total=total, desc=desc, unit=unit, leave=mode == "lines", enabled=enabled) as b:
        yield from b


class TrainProgress:
    """The training bar: steps done of the run's total, with the loss and samples/s as a postfix.

    The loss is read (`float(tensor)`, a device sync) at most every `POSTFIX_INTERVAL_S`, so the bar costs nothing
    measurable per step. In "bar" mode, log records are printed above the bar instead of through it.
    """

    def __init__(self, total: int, initial: int, samples_per_step: int, enabled: bool, desc: str = "train"):
        self.samples_per_step = samples_per_step
        self.bar = bar(total=total, initial=initial, desc=desc, unit="step", enabled=enabled, delay=LINE_DELAY_S)
        self._last_time, self._last_n = time.perf_counter(), initial
        self._redirect = contextlib.ExitStack()
        if progress_mode() == "bar" and enabled:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect.enter_context(logging_redirect_tqdm())

    def step(self, losses: dict | None, epoch: int) -> None:
        """One optimizer step done (`losses` None: a skipped step, which the bar does not count)."""
        if losses is None or self.bar.disable:
            return
        self.bar.update(1)
        now = time.perf_counter()
        if now - self._last_time >= POSTFIX_INTERVAL_S:
            rate = (self.bar.n - self._last_n) * self.samples_per_step / (now - self._last_time)
            total = losses.get("total")
            self.bar.set_postfix_str(f"epoch {epoch}, loss {float(total.detach()):.4f}, {rate:.0f} samples/s"
                                     if total is not None else f"epoch {epoch}, {rate:.0f} samples/s",
                                     refresh=False)
            self._last_time, self._last_n = now, self.bar.n

    def close(self, failed: bool = False) -> None:
        """`failed`: the run stops on an error; the bar is cleared, not left, so the error is the last thing shown."""
        if failed:
            self.bar.leave = False
        self.bar.close()
        self._redirect.close()
