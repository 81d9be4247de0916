"""Engines: the seam (``protocol``), the transformers ``generate`` adapter (``static``) and the continuous engine."""

from llamactl.server.engine.protocol import (
    Engine,
    EngineState,
    FinishReason,
    GenParams,
    GenRequest,
    GenResult,
    ServingEngine,
)

__all__ = ["Engine", "EngineState", "FinishReason", "GenParams", "GenRequest", "GenResult", "ServingEngine"]
