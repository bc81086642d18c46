"""mmctl: build language and vision-language models from scratch, one pipeline stage at a time."""

__version__ = "0.1.0"
