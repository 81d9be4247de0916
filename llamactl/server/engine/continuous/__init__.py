"""The continuous-batching engine for Llama 3.2 Vision (see ``engine`` for the step loop)."""

from llamactl.server.engine.continuous.engine import ContinuousEngine

__all__ = ["ContinuousEngine"]
