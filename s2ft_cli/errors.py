"""User-facing errors.

Every mistake a user can make (a bad recipe key, an unsupported architecture, an adapter
for another base) raises :class:`S2FTError` with a one-paragraph message that names the
offending thing and says how to fix it. The CLI prints the message and exits non-zero,
without a traceback unless ``--debug`` is given.
"""


class S2FTError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""


class AdapterMismatchError(S2FTError):
    """An adapter was loaded onto a base model it was not trained on."""


class TrainingInterrupted(S2FTError):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint; the command exits
    with ``exit_code``, the shell's convention for the signal (130 for SIGINT, 143 for
    SIGTERM)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
