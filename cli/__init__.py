"""Command-line entry points (installed as `offline_kd.cli`)."""
