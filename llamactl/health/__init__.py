"""llamactl.health."""
