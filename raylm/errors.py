"""raylm's own error types: the conditions a user can fix, each raised with a message that
names the file, key or value and what would fix it.

The CLI prints exactly these (`UserError` and its subclasses) as one line and exits 2; any
other exception is a bug in raylm or a library and keeps its traceback. A library error that
a user can act on is re-raised as one of these `from` the original, so the cause stays
reachable with `--debug`.

Each type keeps its historical base (`ValueError` or `OSError`) as well, so code that caught
`except ValueError` around a config or data call still works.
"""

from __future__ import annotations


class UserError(Exception):
    """A condition the user can fix (input, config, storage, environment); the message says
    which and how. Never raise it for a broken invariant inside raylm: that is a bug."""


class ConfigError(UserError, ValueError):
    """A config key, value or file is wrong; the message names it."""


class DataError(UserError, ValueError):
    """Bad input data; the message names the file (and line) and what is wrong."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is incomplete, corrupt or not a raylm checkpoint; the message names the file."""


class TrainingStopped(UserError, FloatingPointError):
    """Training stopped on purpose by one of its guards (non-finite steps, a loss spike with
    train.on_spike=stop, rollbacks exhausted); the message names the setting."""


class TrainingTimeout(UserError, TimeoutError):
    """Training ran past train.timeout_s."""


class DeviceOutOfMemory(UserError, MemoryError):
    """A training step needed more accelerator memory than the device has: every restart of
    the same config would fail the same way, so it ends the run at once (not after
    --max-failures restarts), naming the settings that lower it."""


class StorageError(UserError, OSError):
    """A storage operation failed. The message is one line: `<uri>: <what is wrong> (<fix>)`."""

    def __init__(self, uri: str, problem: str) -> None:
        from raylm.storage import redact_url  # messages reach logs and terminals

        uri, problem = redact_url(uri), redact_url(problem)
        super().__init__(f"{uri}: {problem}".replace("\n", " "))
        self.uri = uri
        self.problem = problem

    def __reduce__(self):  # Ray pickles task exceptions; OSError's default would lose `problem`
        return type(self), (self.uri, self.problem)


class OutputExistsError(UserError, FileExistsError):
    """An output the user named (an export directory, file or prefix) exists already, and
    raylm never writes over one; a `FileExistsError` too, for callers that catch that."""


class PathNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named (a tokenizer, a run, a checkpoint) does not exist;
    a `FileNotFoundError` too, for callers that catch that."""
