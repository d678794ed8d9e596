"""Downstream fine-tuning (`kd finetune`): does the student keep what matters?

`tasks` (what a ``--task`` names, loading and checking it), `metrics` (official metrics with
scikit-learn / scipy), `finetune` (cells: checks, fingerprints, resume), `trainer` (one cell with
transformers' `Trainer`), `speed` (size, CPU latency, GPU throughput), `report` (JSON, markdown,
PNG, model card) and `run` (`finetune(cfg)`, the whole run).
"""
