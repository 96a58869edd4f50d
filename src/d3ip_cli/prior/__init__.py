"""prior layer."""
