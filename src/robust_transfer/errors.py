"""The one exception type for mistakes a user can fix (bad input, missing data, bad files)."""


class RobustTransferError(Exception):
    """A user-facing error: the message says what went wrong and what to do about it.

    The command line prints the message alone and exits with status 2; programming errors
    keep their traceback.
    """
