"""raylm: build a large language model from scratch on Ray."""

__version__ = "0.1.0"
