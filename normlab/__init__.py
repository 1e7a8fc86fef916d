"""normlab: runnable, seeded experiments that test the common claims about Batch Normalization."""

__version__ = "0.1.0"
