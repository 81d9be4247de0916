"""llamactl.inventory."""
