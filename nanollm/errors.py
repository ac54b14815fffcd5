"""The one exception type for mistakes a user can fix (bad paths, bad values, bad checkpoints)."""


class NanoLLMError(Exception):
    """A user-facing error: its message is one line that says what is wrong and how to fix it.

    Entry points catch it and print the message without a traceback; anything else is a bug
    and keeps its traceback.
    """

    exit_code = 1


class TrainingInterrupted(NanoLLMError):
    """Ctrl-C stopped training after a checkpoint was saved; exits with the conventional status 130."""

    exit_code = 130
