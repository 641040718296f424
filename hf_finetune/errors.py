"""The one exception type that reaches a user as a message instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint) that they can fix.

    The message is one paragraph: what is wrong, naming the file / key / value, and how to fix it.
    The command-line entry points print it and exit with status 2; library callers can catch it.
    """
