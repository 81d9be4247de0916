"""llamactl: deploy, operate and serve a Llama 3.2 Vision inference cluster."""

__version__ = "0.1.0"
