"""Errors that reach users as one clear line."""


class SpinflowError(Exception):
    """An error whose message is meant for the user, printed without a traceback."""


class ConfigError(SpinflowError):
    """params.yaml (or another config file) is invalid."""


class DataError(SpinflowError):
    """An input data file is missing or malformed."""


class ModelError(SpinflowError):
    """A model source cannot be resolved or loaded."""


class TrainingError(SpinflowError):
    """Training cannot continue (for example a NaN loss)."""
