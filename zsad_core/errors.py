"""One error type for everything a user can fix; the CLI prints it as one line and exits non-zero."""


class ZsadError(Exception):
    """A problem with the user's input (file, option, checkpoint); the message names it and the fix."""


class CheckpointError(ZsadError):
    """A checkpoint that does not belong to the method, or cannot be read."""


class OptionError(ZsadError):
    """An unknown method, option name or option value."""
