"""kltune: typed, composable RLHF building blocks."""

__version__ = "0.1.0"
