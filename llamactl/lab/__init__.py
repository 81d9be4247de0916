"""llamactl.lab."""
