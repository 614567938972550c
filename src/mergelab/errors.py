"""User-facing errors.

Every error raised for bad input is a :class:`MergeLabError`. Its message names the file, tensor,
recipe key or parameter at fault and says what was expected; the CLI prints it without a traceback
and exits non-zero.
"""


class MergeLabError(Exception):
    """Bad input or an unusable environment, explained for the user."""


class RecipeError(MergeLabError):
    """The recipe is malformed: unknown key or method, missing or out-of-range parameter."""


class CheckpointError(MergeLabError):
    """An input checkpoint cannot be used: missing, not local, corrupt, or inconsistent."""


class OutputError(MergeLabError):
    """The output location cannot be written, or exists and would be clobbered."""


class NonFiniteError(MergeLabError):
    """An input tensor holds NaN or inf."""
