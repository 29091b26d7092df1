"""How every `gptq-convert` command reports an expected user error: one line, exit status 1, no traceback."""

from __future__ import annotations

from contextlib import contextmanager

import click


@contextmanager
def user_errors():
    """Report checkpoint problems as one clear line and exit status 1, without a traceback."""
    try:
        yield
    except (ValueError, OSError) as e:  # FormatError is a ValueError; missing/existing paths are OSErrors
        raise click.ClickException(str(e)) from e
