"""ctxrobot: a context-aware real-time task runtime for small robots."""

__version__ = "0.1.0"
