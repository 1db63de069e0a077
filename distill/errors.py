"""Errors that mean "the user's input is wrong": the CLI prints them as one clear line and exits 2."""


class UserError(ValueError):
    """Bad input: which file or option, what was found, what was expected."""
