"""A tiny real BERT teacher built locally: a WordPiece vocabulary trained on the given text, random weights.

The test suite and the CPU benchmarks need a masked-LM teacher without the hub: `build_tiny_teacher`
trains a vocabulary on a few documents and saves a small randomly initialised `BertForMaskedLM`
with its tokenizer, loadable by `kd precompute` like any saved teacher. `make_documents` writes
deterministic pseudo-English documents to train it on.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the a an of to in and or but with from by for on at as is was were be been are this that these "
    "those it he she they we you i my your his her their our house garden river letter morning evening "
    "walk talk read write sister brother mother father friend heart mind day night year time hand eye "
    "good great small young old happy quiet long short little first last never always often very much "
    "said thought felt knew saw came went gave took made found told asked answered replied looked"
).split()


def make_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English documents of varied length (some very short, for the filters)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        n_sent = 1 if i % 7 == 0 else rng.randint(2, 8)
        sents = []
        for _ in range(n_sent):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            sents.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
        docs.append(" ".join(sents))
    return docs


def build_tiny_teacher(
    out_dir: Path, docs: list[str], hidden: int = 32, layers: int = 4, seed: int = 0
) -> Path:
    """Train a WordPiece vocab on `docs` and save a randomly initialised tiny BertForMaskedLM beside it."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(docs, vocab_size=300, min_frequency=1)
    wp.save_model(str(out_dir))
    # transformers 5.x: a positional path (not vocab_file=) loads the full vocab.
    tok = BertTokenizerFast(str(out_dir / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForMaskedLM(config)
    # Spread the logits so top-k and tail mass are not trivially uniform.
    with torch.no_grad():
        model.cls.predictions.decoder.weight.mul_(20.0)
    model.save_pretrained(out_dir)
    return out_dir
