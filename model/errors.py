"""Errors a user can cause. Each carries one sentence that names the problem and the fix.

The CLI prints `str(error)` and exits non-zero; library callers catch `DinosegError`.
"""


class DinosegError(Exception):
    """Base class: a problem with the user's input, options, files or weights."""


class UnknownModelError(DinosegError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsError(DinosegError):
    """A weights file is missing, unreadable, unsafe, or belongs to another model."""


class ImageInputError(DinosegError, ValueError):
    """An image array of the wrong type or shape was passed in."""
