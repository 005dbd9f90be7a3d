"""The project's exceptions: a user's mistake raises one of these (the CLI prints it as one line, exit 2);
anything else is a bug and keeps its traceback."""
from __future__ import annotations


class BicascadeError(Exception):
    """Base of every error a user can cause and fix."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownNameError(BicascadeError, KeyError):
    """An unknown model, ladder or profile name; the message lists the known ones."""


class NotIndexedError(BicascadeError, LookupError):
    """A database (or a table, or an image) that has not been indexed yet; the message says how to index it."""


class BadInputError(BicascadeError, ValueError):
    """A value the user gave that cannot work: a missing source, wrong cutoffs, a mismatched ladder, a bad file."""


class MissingWeightsError(BicascadeError, RuntimeError):
    """A checkpoint that is missing or does not fit, or pretrained weights that need the (unreachable) model hub."""


class StaleEncoder(RuntimeError):
    """A call meant for another model than this replica's: during a migration's rolling update an old router can
    reach a new encoder. Refused, so no vector of one model lands in another's cache; the caller retries. Not a user's
    error: nobody sees it."""
