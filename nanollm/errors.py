"""The one exception type for mistakes a user can fix (bad paths, bad values, bad checkpoints)."""


class NanoLLMError(Exception):
    """A user-facing error: its message is one line that says what is wrong and how to fix it.

    Entry points catch it and print the message without a traceback; anything else is a bug
    and keeps its traceback.
    """
