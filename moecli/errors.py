"""Errors the CLI turns into one-line messages.

``UserError`` means the user gave us something we cannot use (a bad recipe, a
missing file, a flag out of range): the CLI prints ``error: <message>`` and
exits with code 2. Anything else that escapes is an unexpected failure (exit 1).
"""


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""

    exit_code = 2


def check_at_least(flag: str, value, low, note: str = "") -> None:
    """A numeric option below its minimum is bad input: ``--flag: must be >= low, got value``."""
    if value < low:
        raise UserError(f"{flag}: must be >= {low}{note}, got {value}")


class RunFailed(Exception):
    """A run that started fine but could not finish (e.g. the loss became NaN): exit code 1."""

    exit_code = 1


class Interrupted(Exception):
    """A run stopped by a signal after saving what it had done: "SIGNAME: message", exit code 128 + the
    signal's number (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a process the signal ended."""

    def __init__(self, message: str, signum: int):
        import signal

        super().__init__(f"{signal.Signals(signum).name}: {message}")
        self.message, self.exit_code = message, 128 + signum
