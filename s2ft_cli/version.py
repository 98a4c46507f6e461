"""The tool's version: recorded in adapters, exports and evaluation results, and read by
``pyproject.toml`` (one place to change it)."""

__version__ = "0.1.0"
