"""Corpus ingestion: read documents through `datasets`, hold some out, tokenize and pack them.

Packing scheme (documented in docs/store-format.md): documents are shuffled with a seeded
permutation, tokenized without special tokens, and concatenated as a stream
``doc_a [SEP] doc_b [SEP] ...``. The stream is cut into pieces of ``max_length - 1`` tokens and
each piece is prefixed with ``[CLS]``; long documents therefore continue in the next sequence.
Packing runs inside ``datasets.map(batched=True)`` over ``pack_batch_documents`` documents at a
time, so the only padding is at the end of the last sequence of each batch (at most one
partially filled sequence per ``pack_batch_documents`` documents, i.e. near-zero waste). The
result is an arrow-backed ``datasets.Dataset``; nothing corpus-sized is held in RAM.

Degenerate sequences are dropped as in DistilBERT's data preparation: sequences with at most
``min_tokens`` (11) real tokens, and sequences whose non-special tokens are more than
``max_unk_fraction`` (50%) ``[UNK]``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from offline_kd.errors import UsageError

TEXT_SUFFIXES = {".txt", ".text", ".md", ""}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.-]+)?$")
MIN_TOKENS = 11  # sequences with at most this many real tokens are dropped (DistilBERT's filter)


class CorpusError(UsageError):
    """Bad corpus input: empty, undecodable, missing or of an unknown kind."""


@dataclass
class CorpusStats:
    """What ingestion did, recorded in the store's ``corpus`` attributes."""

    sources: list[str]
    text_field: str
    documents: int = 0
    held_out_documents: int = 0
    holdout_fraction: float = 0.0
    holdout_file: str | None = None
    packed_sequences: int = 0
    dropped_short: int = 0
    dropped_unk: int = 0
    num_sequences: int = 0
    filters: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "sources": list(self.sources),
            "text_field": self.text_field,
            "documents": self.documents,
            "held_out_documents": self.held_out_documents,
            "holdout": {"fraction": self.holdout_fraction, "file": self.holdout_file},
            "packed_sequences": self.packed_sequences,
            "dropped_short": self.dropped_short,
            "dropped_unk": self.dropped_unk,
            "num_sequences": self.num_sequences,
            "filters": dict(self.filters),
        }


def _source_kind(src: str) -> str:
    p = Path(src)
    if p.exists():
        if p.is_dir():
            raise CorpusError(f"corpus source {src!r} is a directory; pass its files")
        suffix = p.suffix.lower()
        if suffix in JSON_SUFFIXES:
            return "json"
        if suffix in PARQUET_SUFFIXES:
            return "parquet"
        return "text"
    if "://" in src and not src.startswith("hf://"):
        suffix = Path(src.split("?")[0]).suffix.lower()
        return "json" if suffix in JSON_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else "text"
    suffix = Path(src.partition(":")[0]).suffix.lower()
    if (
        src.startswith((os.sep, ".", "~"))
        or suffix in TEXT_SUFFIXES - {""} | JSON_SUFFIXES | PARQUET_SUFFIXES
    ):
        raise CorpusError(f"corpus file {src!r} does not exist")
    if not HUB_NAME.match(src):
        raise CorpusError(
            f"{src!r} is neither an existing file nor a hub dataset name (NAME or ORG/NAME[:CONFIG])"
        )
    return "hub"


def check_sources(sources: str | Sequence[str]) -> None:
    """Refuse a missing corpus file or a malformed dataset name before anything is read."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise CorpusError("no corpus sources given")
    for src in sources:
        _source_kind(str(src))


def _find_bad_utf8(path: str) -> tuple[int, str] | None:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return lineno, str(e)
    return None


def _corpus_error(src: str, kind: str, e: Exception) -> CorpusError:
    cause = e
    while cause is not None and not isinstance(cause, UnicodeDecodeError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, UnicodeDecodeError):
        where = _find_bad_utf8(src) if kind != "hub" and Path(src).is_file() else None
        line = f" at line {where[0]}" if where else ""
        return CorpusError(f"corpus file {src!r} is not valid UTF-8{line}: {cause}")
    return CorpusError(f"could not read corpus source {src!r}: {e}")


def load_documents(
    sources: str | Sequence[str],
    text_field: str | None = None,
    split: str = "train",
    config_name: str | None = None,
):
    """Load documents from text files (one per line), jsonl/parquet files or a hub dataset (``NAME[:CONFIG]``).

    Returns an arrow-backed ``datasets.Dataset`` with one column ``text``; blank documents are
    dropped. Raises :class:`CorpusError` for an empty corpus or undecodable bytes.
    """
    import datasets

    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [str(s) for s in sources]
    if not sources:
        raise CorpusError("no corpus sources given")
    field_name = text_field or "text"
    parts = []
    for src in sources:
        kind = _source_kind(src)
        if kind != "hub" and Path(src).is_file() and Path(src).stat().st_size == 0:
            raise CorpusError(f"corpus file {src!r} is empty")
        try:
            if kind == "hub":  # NAME or NAME:CONFIG, e.g. wikimedia/wikipedia:20231101.en
                name, _, config = src.partition(":")
                ds = datasets.load_dataset(name, config or config_name, split=split)
            else:
                ds = datasets.load_dataset(kind, data_files=[src], split="train")
            if field_name not in ds.column_names:
                raise CorpusError(
                    f"corpus source {src!r} has no field {field_name!r} (columns: {ds.column_names}); "
                    "pass --text-field"
                )
            ds = ds.select_columns([field_name])
            if field_name != "text":
                ds = ds.rename_column(field_name, "text")
            # Decoding to Python strings here also surfaces bad bytes the arrow readers let through.
            ds = ds.filter(
                lambda b: [isinstance(t, str) and t.strip() != "" for t in b["text"]], batched=True
            )
        except CorpusError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise _corpus_error(src, kind, e) from e
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(ds) == 0:
        raise CorpusError(f"the corpus is empty: no non-blank documents in {sources}")
    return ds


def holdout_score(text: str, seed: int) -> float:
    """Deterministic value in [0, 1) from the document text and seed."""
    h = hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def split_holdout(documents, fraction: float, seed: int = 0):
    """Split a ``text`` Dataset into (kept, held_out) by a hash of each document and the seed."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return documents, documents.select([])

    def flag(batch):
        return {"_held": [holdout_score(t, seed) < fraction for t in batch["text"]]}

    flagged = documents.map(flag, batched=True)
    kept = flagged.filter(lambda b: [not x for x in b["_held"]], batched=True).remove_columns("_held")
    held = flagged.filter(lambda b: b["_held"], batched=True).remove_columns("_held")
    return kept, held


def write_documents(documents, path: str | os.PathLike) -> int:
    """Write a ``text`` Dataset one document a line (newlines inside a document become spaces)."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for batch in documents.iter(batch_size=1000):
            for t in batch["text"]:
                f.write(" ".join(t.splitlines()) + "\n")
                n += 1
    return n


def pack_sequences(
    documents,
    tokenizer,
    max_length: int = 512,
    seed: int = 0,
    shuffle: bool = True,
    min_tokens: int = MIN_TOKENS,
    max_unk_fraction: float = 0.5,
    pack_batch_documents: int = 1000,
    stats: CorpusStats | None = None,
):
    """Tokenize and pack documents into ``[CLS] doc [SEP] doc [SEP] ...`` sequences of ``max_length``.

    Returns an arrow-backed Dataset with columns ``input_ids`` (``max_length`` ints, padded with
    the pad id) and ``length`` (number of real tokens). Degenerate sequences are filtered out.
    """
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    unk_id = tokenizer.unk_token_id
    if cls_id is None or sep_id is None or pad_id is None:
        raise ValueError("the tokenizer needs [CLS], [SEP] and [PAD] tokens for packing")
    if max_length < 4:
        raise ValueError("max_length must be at least 4")
    piece = max_length - 1
    docs = documents.shuffle(seed=seed) if shuffle else documents
    special = set(tokenizer.all_special_ids)

    def pack(batch):
        enc = tokenizer(batch["text"], add_special_tokens=False, truncation=False, verbose=False)
        stream: list[int] = []
        for ids in enc["input_ids"]:
            if ids:
                stream.extend(ids)
                stream.append(sep_id)
        out_ids, out_len = [], []
        for start in range(0, len(stream), piece):
            seq = [cls_id] + stream[start : start + piece]
            n = len(seq)
            out_ids.append(seq + [pad_id] * (max_length - n))
            out_len.append(n)
        return {"input_ids": out_ids, "length": out_len}

    packed = docs.map(
        pack,
        batched=True,
        batch_size=pack_batch_documents,
        remove_columns=docs.column_names,
        desc="packing",
    )

    def keep(batch):
        res = {"_short": [], "_unk": []}
        for ids, n in zip(batch["input_ids"], batch["length"], strict=True):
            short = n <= min_tokens
            real = [t for t in ids[:n] if t not in special or t == unk_id]
            unk = (
                unk_id is not None
                and len(real) > 0
                and sum(t == unk_id for t in real) > max_unk_fraction * len(real)
            )
            res["_short"].append(short)
            res["_unk"].append(bool(unk) and not short)
        return res

    flagged = packed.map(keep, batched=True, desc="filtering")
    flags = flagged.select_columns(["_short", "_unk"]).with_format("numpy")
    short = unk = 0
    for b in flags.iter(batch_size=65536):
        short += int(np.sum(b["_short"]))
        unk += int(np.sum(b["_unk"]))
    result = flagged.filter(
        lambda b: [not (s or u) for s, u in zip(b["_short"], b["_unk"], strict=True)], batched=True
    ).remove_columns(["_short", "_unk"])
    if stats is not None:
        stats.packed_sequences = len(packed)
        stats.dropped_short = short
        stats.dropped_unk = unk
        stats.num_sequences = len(result)
        stats.filters = {"drop_if_length_at_most": min_tokens, "max_unk_fraction": max_unk_fraction}
    return result


def corpus_fingerprint(packed, batch_size: int = 1024) -> str:
    """sha256 over the packed sequences (ids as int32 little-endian, then lengths): content, not paths."""
    h = hashlib.sha256()
    for batch in packed.with_format("numpy").iter(batch_size=batch_size):
        h.update(np.ascontiguousarray(batch["input_ids"], dtype="<i4").tobytes())
        h.update(np.ascontiguousarray(batch["length"], dtype="<i4").tobytes())
    return h.hexdigest()


def token_counts(packed, vocab_size: int, batch_size: int = 1024) -> np.ndarray:
    """Occurrence count of each token id over the real tokens of the packed corpus."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in packed.with_format("numpy").iter(batch_size=batch_size):
        ids = batch["input_ids"]
        lens = batch["length"]
        mask = np.arange(ids.shape[1])[None, :] < lens[:, None]
        counts += np.bincount(ids[mask].ravel(), minlength=vocab_size)[:vocab_size]
    return counts


def prepare_corpus(
    sources,
    tokenizer,
    max_length: int = 512,
    seed: int = 0,
    text_field: str | None = None,
    holdout_fraction: float = 0.0,
    holdout_file: str | None = None,
    write_holdout: bool = True,
):
    """load -> holdout -> pack -> filter. Returns (packed Dataset, CorpusStats)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [str(s) for s in sources]
    stats = CorpusStats(sources=sources, text_field=text_field or "text")
    docs = load_documents(sources, text_field=text_field)
    stats.documents = len(docs)
    kept, held = split_holdout(docs, holdout_fraction, seed)
    stats.holdout_fraction = holdout_fraction
    stats.held_out_documents = len(held)
    if holdout_file is not None:
        stats.holdout_file = str(holdout_file)
        if write_holdout:
            write_documents(held, holdout_file)
    if len(kept) == 0:
        raise CorpusError(f"no documents left after holding out {holdout_fraction:.0%} of {sources}")
    packed = pack_sequences(kept, tokenizer, max_length=max_length, seed=seed, stats=stats)
    if len(packed) == 0:
        raise CorpusError(f"no sequences left after filtering degenerate ones from {sources}")
    return packed, stats
