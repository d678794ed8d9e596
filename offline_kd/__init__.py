"""offline_kd: offline knowledge distillation for BERT-style masked language models.

Phase one (`kd precompute`) runs the teacher once over a corpus and writes its top-k logits,
full-vocabulary log-sum-exps and last hidden states to a Zarr v3 signal store. Phase two
(`deepspeed cli/train.py`) trains students from that store; the teacher never runs again.
"""

__version__ = "0.1.0"
