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


class MissingBackendError(PromptvaultError, ImportError):
    """MLX is installed without a backend (Linux: `pip install promptvault` without an extra)."""


# The message for MissingBackendError: MLX's Linux wheel carries no backend of its own.
BACKEND_HINT = ('MLX has no backend here (libmlx.so is missing): pip install "promptvault[cpu]" '
                '(or "promptvault[cuda]" for an NVIDIA GPU)')


def missing_backend(error: ImportError) -> bool:
    """The ImportError is MLX's Linux wheel without its backend (`libmlx.so: cannot open …`)."""
    return "libmlx" in str(error)
