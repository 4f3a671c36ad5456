"""Errors a user can act on. Entry points print them as one line and exit non-zero."""

import logging


class UserError(Exception):
    """Bad input (config, dataset, workdir): the message says what to do. No traceback is shown."""


def first_line(e: BaseException, limit: int | None = None, default: str | None = None) -> str:
    """The first non-blank line of ``e``'s message, cut to ``limit`` characters with "..." (some
    libraries put whole trees in messages); ``default`` (else the type's name) for an empty one."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return default if default is not None else type(e).__name__
    line = lines[0].strip()
    return line if limit is None or len(line) <= limit else line[: max(limit - 3, 0)] + "..."


def describe(e: BaseException, limit: int | None = None) -> str:
    """``ExcType: first line of the message`` (at most ``limit`` characters of it), for one error line."""
    text = first_line(e, limit, default="")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class DropMessages(logging.Filter):
    """Drops log records that start with one of ``prefixes``: harmless library chatter that
    would otherwise stand beside, or before, the one line that matters."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)
