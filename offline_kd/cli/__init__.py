"""Command-line entry points: `kd` (kd.py) and the training program the launchers run (train.py)."""
