"""The one exception type users see as a message instead of a traceback."""


class UserError(Exception):
    """Bad input or configuration: the CLI prints the message and exits with status 2."""


class Stopped(KeyboardInterrupt):
    """Training was stopped by a signal (SIGTERM from a preempted pod, Ctrl-C) after writing a checkpoint.

    A KeyboardInterrupt, so whatever handles Ctrl-C handles it too; the CLI exits with 128 + ``signum``.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
