"""DeepSpeed configs shipped with offline_kd (package data, read with importlib.resources)."""
