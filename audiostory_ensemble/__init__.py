"""AudioStory served on Triton: the model package (definitions, reference pipeline, engines)."""

__version__ = "0.1.0"
