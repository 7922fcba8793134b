"""Errors a user can cause. The CLI prints their message as one line and exits with status 2."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, bad config value); the message says how."""
