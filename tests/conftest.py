"""Shared fixtures: a tiny real BERT teacher with a WordPiece vocab trained here (the hub is unreachable)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture(scope="session")
def tiny_docs() -> list[str]:
    return make_documents(60)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, tiny_docs) -> Path:
    """A one-document-a-line text corpus."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(tiny_docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_docs) -> Path:
    """Directory of a saved tiny BertForMaskedLM (4 layers, hidden 32) and its tokenizer."""
    return build_tiny_teacher(tmp_path_factory.mktemp("teacher"), tiny_docs)


# --- signal store fixtures (offline_kd.store / offline_kd.precompute) ---


def run_tiny_precompute(teacher, corpus, output, **overrides):
    """Precompute a tiny store with the settings of the `tiny_store` fixture (overridable)."""
    from offline_kd.precompute import PrecomputeConfig, precompute

    kwargs = dict(
        teacher=str(teacher),
        corpus=[str(corpus)],
        output=str(output),
        max_length=32,
        top_k=8,
        temperatures=[1.0, 2.0],
        views=2,
        hidden=True,
        seed=0,
        batch_size=8,
        shard_size=8,
        chunk_size=4,
        device="cpu",
        progress=False,
    )
    kwargs.update(overrides)
    return precompute(PrecomputeConfig(**kwargs))


# The options of the `tiny_store` fixture, as CLI flags.
TINY_FLAGS = [
    "--max-length", "32", "--top-k", "8", "--temperatures", "1,2", "--views", "2", "--hidden",
    "--seed", "0", "--batch-size", "8", "--shard-size", "8", "--chunk-size", "4", "--device", "cpu",
    "--no-progress",
]  # fmt: skip


def store_files(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_store(a: Path, b: Path) -> None:
    """The two store directories hold the same files, byte for byte."""
    fa, fb = store_files(a), store_files(b)
    assert sorted(fa) == sorted(fb), set(fa) ^ set(fb)
    differing = [k for k in fa if fa[k] != fb[k]]
    assert not differing, differing


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_teacher, tiny_corpus) -> Path:
    """Path of a complete signal store precomputed from `tiny_corpus` with `tiny_teacher`.

    max_length 32, top_k 8, views 2, temperatures [1, 2], hidden states on, 8 sequences a shard
    (4 a chunk). Open it with `offline_kd.store.SignalStore.open(str(path))`. Treat it as read-only.
    """
    out = tmp_path_factory.mktemp("store") / "tiny.zarr"
    run_tiny_precompute(tiny_teacher, tiny_corpus, out)
    return out
