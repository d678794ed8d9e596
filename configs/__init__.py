"""DeepSpeed configs shipped with offline_kd (installed as `offline_kd.configs`, read with importlib.resources)."""
