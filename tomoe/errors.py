"""User-facing errors.

Anything raised as :class:`ToMoEError` is a problem with the user's input (a bad ratio, a missing file, an
unsupported model). The CLI prints its message as one paragraph and exits with status 2 instead of showing a
traceback.
"""


class ToMoEError(Exception):
    """An error in what the user asked for, with a message that says what is wrong and what is accepted."""
