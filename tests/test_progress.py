"""Progress bars: the mode detection, plain lines (no carriage returns) off a terminal, the training bar's counts."""

import io
import sys

import pytest
import torch

from training import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def stderr(monkeypatch):
    def use(stream):
        monkeypatch.setattr(sys, "stderr", stream)
        return stream

    monkeypatch.delenv(progress.ENV_VAR, raising=False)
    return use


def test_mode_follows_the_terminal_and_the_override(stderr, monkeypatch):
    stderr(_Tty())
    assert progress.progress_mode() == "bar"
    stderr(io.StringIO())
    assert progress.progress_mode() == "lines"
    for mode in progress.MODES:
        monkeypatch.setenv(progress.ENV_VAR, mode.upper())
        assert progress.progress_mode() == mode
    monkeypatch.setenv(progress.ENV_VAR, "bogus")  # an unknown value falls back to detection
    assert progress.progress_mode() == "lines"


def test_lines_mode_writes_few_newline_terminated_lines(stderr, monkeypatch):
    out = stderr(io.StringIO())
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 3600.0)
    assert list(progress.iterate(range(5000), desc="zero-shot demo")) == list(range(5000))
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3, lines  # the start and the end, not one per item
    assert "zero-shot demo" in lines[-1] and "5000/5000" in lines[-1]


def test_bar_mode_redraws_in_place(stderr):
    out = stderr(_Tty())
    for _ in progress.iterate(range(3), desc="retrieval val"):
        pass
    assert "\r" in out.getvalue() and "retrieval val" in out.getvalue()


def test_off_and_disabled_write_nothing(stderr, monkeypatch):
    out = stderr(io.StringIO())
    assert list(progress.iterate(range(4), desc="x", enabled=False)) == [0, 1, 2, 3]
    monkeypatch.setenv(progress.ENV_VAR, "off")
    assert list(progress.iterate(range(4), desc="x")) == [0, 1, 2, 3]
    assert out.getvalue() == ""


def test_training_bar_counts_steps_and_shows_loss_and_throughput(stderr, monkeypatch):
    out = stderr(io.StringIO())
    monkeypatch.setattr(progress, "POSTFIX_INTERVAL_S", 0.0)
    monkeypatch.setattr(progress, "LINE_DELAY_S", 0.0)
    bar = progress.TrainProgress(total=10, initial=2, samples_per_step=64, enabled=True)
    for i in range(5):
        bar.step({"total": torch.tensor(1.5 - 0.1 * i)}, epoch=0)
    bar.step(None, epoch=0)  # a skipped (non-finite) step is not counted
    assert bar.bar.n == 7
    bar.close()
    last = out.getvalue().splitlines()[-1]
    assert "7/10" in last and "loss 1.1000" in last and "samples/s" in last and "epoch 0" in last


def test_a_run_that_fails_before_the_first_line_leaves_only_its_error(stderr):
    """lines mode: a run that stops on bad input within LINE_DELAY_S writes no bar line, so its stderr is the one
    error line."""
    out = stderr(io.StringIO())
    bar = progress.TrainProgress(total=10, initial=0, samples_per_step=64, enabled=True)
    bar.close(failed=True)
    assert out.getvalue() == ""
