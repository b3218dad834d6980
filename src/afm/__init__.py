"""afm: the AFM model family end to end, from data to a served model."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):  # lazy: `import afm` stays light for the CLI and for tooling
    if name in ("LLM", "SamplingParams"):
        from afm import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'afm' has no attribute {name!r}")
