"""llamactl.server."""
