"""Errors a user can cause, and failures a run records: the CLI prints a user error's message as one line and exits
with status 2; a recorded failure ends one method's run as ``failed`` and the next method runs."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, bad config value); the message says how."""


class RecordedFailure(Exception):
    """A failure of one run that the run records in its folder and moves past, e.g. a diverging loss
    (:func:`clbench.engine.session.execute`); :meth:`record` gives the manifest's extra fields."""

    def record(self) -> dict:
        return {}
