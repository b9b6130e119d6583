"""Errors that promptvault reports to people, not stack traces.

The CLI prints a PromptvaultError's message as one line and exits non-zero, so each message
must say what went wrong and, where it can, what to do about it.
"""


class PromptvaultError(Exception):
    """Base class: an expected failure with a one-line, user-facing message."""


class ModelLoadError(PromptvaultError):
    """A model could not be found, read, converted or loaded."""


class UnsupportedModelError(ModelLoadError):
    """The model file is readable but uses an architecture or tokenizer promptvault cannot convert."""
