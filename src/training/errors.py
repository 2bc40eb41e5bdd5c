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
