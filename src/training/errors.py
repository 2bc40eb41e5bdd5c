"""The errors every layer raises, and the one way an entry point turns them into a one-line message.

`UsageError`: bad user input (flags, files, data), printed as one line, exit code 2. Domain errors subclass it.
`TrainingError`: training cannot go on (e.g. too many non-finite losses), one line, exit code 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UsageError(ValueError):
    """Bad user input: printed as one line, exit code 2."""


class WorkerUsageError(UsageError):
    """A UsageError that may be raised inside a DataLoader worker: torch re-raises it in the main process with the
    worker's traceback as its message, and this keeps the one line of the original."""

    def __init__(self, message: str = ""):
        message = str(message)
        if message.startswith("Caught ") and "Traceback" in message:
            last = [line for line in message.strip().splitlines() if line.strip()][-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


# ---- the domain errors: each a UsageError, so every entry point prints it as one line, exit 2 ---------------------
class DistillSpecError(UsageError):
    """A distillation request this run cannot honour: a bad spec or option (`distill.spec` adds the valid terms),
    or a tower that cannot give what a term needs."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class TeacherCacheError(WorkerUsageError):
    """A teacher-cache problem (also when raised in a DataLoader worker and re-raised by torch)."""


class UnusableRowsError(WorkerUsageError):
    """So many bad CSV rows in a row that the data (or --data-root) is wrong, not a few samples."""


class NoDataError(WorkerUsageError):
    """A WebDataset reader's shards hold no usable sample, so it cannot produce its share of batches."""


class DatasetError(UsageError):
    """An evaluation dataset path or file that cannot be used."""


class TrainingError(RuntimeError):
    """Training cannot continue: one line, exit code 1."""


class NonFiniteLossError(TrainingError):
    pass


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def usage_error(context: str, exc: BaseException) -> UsageError:
    """`context: <first line of exc>` as a UsageError (raise it `from exc`)."""
    return UsageError(f"{context}: {first_line(exc)}")


def run_cli(run: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Every entry point's main(): run, and print a UsageError (exit 2) or TrainingError (exit 1) as one line."""
    try:
        return run(argv) or 0
    except UsageError as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 1
