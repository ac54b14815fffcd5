"""The one exception type for mistakes a user can fix (bad paths, bad values, bad checkpoints)."""

from __future__ import annotations


class NanoLLMError(Exception):
    """A user-facing error: its message is one line that says what is wrong and how to fix it.

    Entry points catch it and print the message without a traceback; anything else is a bug
    and keeps its traceback.
    """

    exit_code = 1


class TrainingInterrupted(NanoLLMError):
    """A signal (Ctrl-C, SIGTERM) stopped training after a checkpoint was saved; exits with 128 + the signal."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code

    @classmethod
    def again(cls, checkpoint_dir) -> TrainingInterrupted:
        """A second Ctrl-C, which stops before the first one's save: what is kept, and how to go on."""
        return cls(
            "interrupted again before this step's state was saved; the checkpoints saved before it are in "
            f"{checkpoint_dir}: resume with the same command plus ckpt_path=last."
        )


class SweepError(NanoLLMError):
    """A mistake that every job of a sweep would repeat: the sweep stops at once instead of recording it per job."""


class RunDirectoryTaken(NanoLLMError):
    """The run directory holds another run's checkpoints. The message gives the command line's remedy;
    the API words its own from `directory` and `resume_from`."""

    def __init__(self, message: str, directory, resume_from=None):
        super().__init__(message)
        self.directory = directory
        self.resume_from = resume_from
