"""The one exception type for mistakes a user can make and fix.

The entry points turn it into a single line on stderr and exit status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's config, files or command line; the message says what and how to fix it."""


@contextmanager
def one_line_errors(cleanup: Callable[[], object] | None = None) -> Iterator[None]:
    """For a command line's main: a UserError ends in `error: <message>` on stderr and exit status 2, after
    cleanup() (e.g. removing what the stopped command made); LLMTRAIN_DEBUG=1 keeps the traceback and all files."""
    try:
        yield
    except UserError as e:
        if os.environ.get("LLMTRAIN_DEBUG"):
            raise
        if cleanup is not None:
            cleanup()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
