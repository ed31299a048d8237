"""The one exception type that the command line turns into a one-line error and exit status 2."""


class UserError(Exception):
    """Bad input from the user (an option, a path, a config value): reported without a traceback."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for a one-line error
    about a file a library refused."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
