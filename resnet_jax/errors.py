"""Errors a user can act on. Entry points print them as one line and exit non-zero."""


class UserError(Exception):
    """Bad input (config, dataset, workdir): the message says what to do. No traceback is shown."""


def describe(e: BaseException, limit: int | None = None) -> str:
    """``ExcType: first line of the message`` (at most ``limit`` characters of it), for one error line."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__
