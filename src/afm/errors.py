"""Exceptions afm raises for bad input. Each message says what was wrong, where, and how to fix it."""


class AFMError(Exception):
    """Base class for errors caused by the user's input rather than a bug in afm."""


class ConfigError(AFMError, ValueError):
    """A model, recipe or engine configuration is invalid or names something unknown."""


class CheckpointError(AFMError):
    """A checkpoint directory or file is missing, truncated or does not match its config."""


class TokenizerError(AFMError):
    """A tokenizer file or chat template cannot be loaded or applied."""
