"""llamactl.remote."""
