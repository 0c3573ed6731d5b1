"""Adapter methods (tuners). Each is found through the registry (``peftcore.methods`` entry points)."""
