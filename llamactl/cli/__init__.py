"""llamactl.cli."""
