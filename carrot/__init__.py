"""CARROT: confusion-aware representation regularizers and their experiment harness."""

__version__ = "0.1.0"
