"""The one exception type that means "the user can fix this"."""


class RegMeanError(Exception):
    """A problem with the user's input (file, field, layer, option).

    The CLI prints the message as a single line and exits non-zero; anything else is a bug and
    keeps its traceback under ``--debug``.
    """
