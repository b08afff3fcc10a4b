"""The one exception type users see as a message instead of a traceback."""


class UserError(Exception):
    """Bad input or configuration: the CLI prints the message and exits with status 2."""
