"""The one exception type for mistakes a user can make and fix.

The entry points turn it into a single line on stderr and exit status 2; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with the user's config, files or command line; the message says what and how to fix it."""
