"""The one exception type for a user's mistake: the CLI prints it as one line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (missing file, bad option, ...). Never used for bugs."""
