"""llamactl.ops."""
