"""stepc: a declarative experiment-spec compiler and runtime for STEP (staged parameter-efficient pre-training)."""

__version__ = "0.1.0"
