"""facellm: the FaceLLM paper (arXiv 2507.10300) as a command-line toolkit."""

__version__ = "0.1.0"
