"""The one exception type that the command line turns into a one-line error and exit status 2."""


class UserError(Exception):
    """Bad input from the user (an option, a path, a config value): reported without a traceback."""
