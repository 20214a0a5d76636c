"""Exceptions users see."""

from __future__ import annotations


class PipefarmError(Exception):
    """Base of pipefarm's own errors."""


class SubmissionError(PipefarmError, ValueError):
    """A task was refused at submission; nothing was written."""


class RetryRefused(PipefarmError, ValueError):
    """``retry`` was asked for tasks that succeeded, without ``force``; nothing changed."""

    def __init__(self, succeeded: int, asked: int, how: str = "pass force=True") -> None:
        self.succeeded = succeeded
        self.asked = asked
        super().__init__(
            f"{succeeded:,} of the {asked:,} task(s) asked for already succeeded; {how} to run"
            " them again (their result is replaced, the earlier attempt stays in the history)"
        )


class RunLocked(PipefarmError):
    """Another live process is executing this run."""


class UnsafeRun(PipefarmError):
    """The run directory can be written by others: pipefarm will not unpickle from it."""


class TaskNotFinished(PipefarmError, LookupError):
    """The task has no result yet."""


class TaskFailed(PipefarmError):
    """A task ended without a result: failed, timed out, lost, skipped or cancelled.

    ``remote_traceback`` holds the traceback text from the worker; ``cause`` the original
    exception when it could travel back.
    """

    def __init__(self, task: int, state: str, error: str | None, cause: BaseException | None = None):
        self.task = task
        self.state = state
        self.remote_traceback = error or ""
        self.cause = cause
        last = (error or "").strip().splitlines()[-1:] or [state]
        super().__init__(f"task {task} {state}: {last[0]}")

    def __str__(self) -> str:
        head = super().__str__()
        if self.remote_traceback and "\n" in self.remote_traceback.strip():
            return f"{head}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return head


class CatalogDamaged(PipefarmError):
    """``RUN/catalog.db`` is not a readable SQLite database (garbage, truncated, emptied).

    Nothing was changed. ``path`` is the catalog file, ``reason`` what SQLite said, ``hint``
    the recovery command (SQLite's ``.dump`` of what is readable; the original is kept
    under ``damaged/``).
    """

    def __init__(self, path: str, reason: str) -> None:
        import shlex
        from pathlib import Path

        self.path = str(path)
        self.reason = reason
        run = Path(path).parent
        self.hint = (
            f"keep the original and recover what is readable: cd {shlex.quote(str(run))} &&"
            " mkdir damaged &&"
            " mv catalog.db* damaged/ && sqlite3 damaged/catalog.db .dump"
            # .dump ends with ROLLBACK at the first unreadable page: keep what it read
            " | sed 's/^ROLLBACK; -- due to errors$/COMMIT;/' | sqlite3 catalog.db"
        )
        super().__init__(f"the catalog {self.path} is damaged ({reason}); nothing was changed")

    def __str__(self) -> str:
        return f"{self.args[0]}. To {self.hint}"


class UnsafeRunWarning(UserWarning):
    """A run directory others can write, opened by a verb that unpickles nothing."""
