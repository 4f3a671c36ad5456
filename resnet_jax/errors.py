"""Errors a user can act on. Entry points print them as one line and exit non-zero."""


class UserError(Exception):
    """Bad input (config, dataset, workdir): the message says what to do. No traceback is shown."""
