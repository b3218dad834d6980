"""afm: the AFM model family end to end, from data to a served model."""

__version__ = "0.1.0"
