"""Errors meant for users.

Every error a user can cause (bad model name, bad plan, bad prompt, ...) is a ``HeadwiseError``. Its message
says what was expected, what was found and what to do; the CLI prints it on one line and exits non-zero.
"""

from __future__ import annotations


class HeadwiseError(Exception):
    """Base class of every user-facing error."""

    exit_code = 2


class ModelLoadError(HeadwiseError):
    """A model could not be found, read or converted."""


class PlanError(HeadwiseError):
    """A head plan is malformed, unknown or does not match the model."""


class InputError(HeadwiseError):
    """A prompt, file or option given by the user is unusable."""


class ContextLengthError(InputError):
    """A prompt (plus the tokens to generate) does not fit the model's context."""


class BudgetError(HeadwiseError):
    """A memory budget is outside what can be met."""
