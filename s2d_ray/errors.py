"""User-facing errors: one clear line, a non-zero exit, never a traceback."""


class S2DError(Exception):
    """A problem with the user's input (config, data, model path, flag).

    The CLI prints ``str(error)`` on one line and exits with ``exit_code``.
    """

    exit_code = 1


class ConfigError(S2DError):
    """The job file or a ``--set`` override is invalid."""

    exit_code = 2


class DataError(S2DError):
    """An input data file is missing, unreadable or lacks a field."""

    exit_code = 2


class ModelError(S2DError):
    """A model path or an embedded model package is missing or corrupt."""

    exit_code = 2
