"""Corpus to masked sequences: corpus sources, tokenizing and packing, the corpus prepared once for every rank, deterministic MLM masking."""
