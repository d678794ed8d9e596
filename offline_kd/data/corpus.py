"""Corpus ingestion: read documents through `datasets` (sources: `offline_kd.data.sources`), join
sentence-a-row sources into documents (``--group-rows``), hold some out, tokenize and pack them.

Packing scheme (documented in docs/store-format.md): documents are shuffled with a seeded
permutation, tokenized without special tokens, and concatenated as a stream
``doc_a [SEP] doc_b [SEP] ...``. The stream is cut into pieces of ``max_length - 1`` tokens and
each piece is prefixed with ``[CLS]``; long documents therefore continue in the next sequence.
Packing runs inside ``datasets.map(batched=True)`` over ``pack_batch_documents`` documents at a
time, so the only padding is at the end of the last sequence of each batch (at most one
partially filled sequence per ``pack_batch_documents`` documents, i.e. near-zero waste). Tokenizing
and filtering run in ``--num-proc`` processes; packing runs in one over fixed batches, so the
sequences never depend on the process count. The result is an arrow-backed ``datasets.Dataset``;
nothing corpus-sized is held in RAM.

Degenerate sequences are dropped as in DistilBERT's data preparation: sequences with at most
``min_tokens`` (11) real tokens, and sequences whose non-special tokens are more than
``max_unk_fraction`` (50%) ``[UNK]``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from offline_kd.data.sources import (  # noqa: F401 - re-exported: the corpus API in one place
    JSON_SUFFIXES,
    PARQUET_SUFFIXES,
    TEXT_SUFFIXES,
    CorpusError,
    CorpusSource,
    check_group_rows,
    check_sources,
    load_source,
    parse_sources,
)

MIN_TOKENS = 11  # sequences with at most this many real tokens are dropped (DistilBERT's filter)


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
    datasets: list[dict] = field(default_factory=list)  # provenance of the dataset sources
    group_rows: dict = field(default_factory=dict)  # {source: rows per document}

    def as_dict(self) -> dict:
        out = {
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
        # Only when used, so that a store of data files keeps the attributes it always had.
        if self.datasets:
            out["datasets"] = [dict(d) for d in self.datasets]
        if self.group_rows:
            out["group_rows"] = dict(self.group_rows)
        return out


def _find_bad_utf8(path: str) -> tuple[int, str] | None:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return lineno, str(e)
    return None


def _corpus_error(source: CorpusSource, e: Exception) -> CorpusError:
    cause = e
    while cause is not None and not isinstance(cause, UnicodeDecodeError):
        cause = cause.__cause__ or cause.__context__
    src = source.spec
    if isinstance(cause, UnicodeDecodeError):
        where = _find_bad_utf8(source.path) if Path(source.path).is_file() else None
        line = f" at line {where[0]}" if where else ""
        return CorpusError(f"corpus file {src!r} is not valid UTF-8{line}: {cause}")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return CorpusError(f"could not read corpus source {src!r}: {first}")


def group_rows(documents, rows: int):
    """Consecutive ``rows`` documents joined into one (a space between them), in order.

    For sources with a sentence a row (BookCorpus): a document of many sentences gets one [SEP]
    and is held out whole. One process, so that the groups never depend on ``--num-proc``."""
    if rows <= 1:
        return documents

    def join(batch):
        texts = batch["text"]
        return {"text": [" ".join(texts[i : i + rows]) for i in range(0, len(texts), rows)]}

    return documents.map(join, batched=True, batch_size=rows * max(1, 4096 // rows), desc="grouping rows")


def load_corpus(
    sources: str | Sequence[str],
    text_field: str | None = None,
    group: dict[str, int] | None = None,
    num_proc: int | None = None,
):
    """Documents of every source (blank ones dropped, rows grouped per ``group``) as one ``text``
    Dataset, and the provenance of the dataset sources. See `offline_kd.data.sources`."""
    import datasets

    parsed = parse_sources(sources)
    field_name = text_field or "text"
    parts, provenance = [], []
    for source in parsed:
        if source.kind != "dataset" and Path(source.path).is_file() and Path(source.path).stat().st_size == 0:
            raise CorpusError(f"corpus file {source.spec!r} is empty")
        try:
            ds, prov = load_source(source, num_proc)
            if field_name not in ds.column_names:
                raise CorpusError(
                    f"corpus source {source.spec!r} has no field {field_name!r} (columns: {ds.column_names}); "
                    "pass --text-field"
                )
            ds = ds.select_columns([field_name])
            if field_name != "text":
                ds = ds.rename_column(field_name, "text")
            # Decoding to Python strings here also surfaces bad bytes the arrow readers let through.
            ds = ds.filter(
                lambda b: [isinstance(t, str) and t.strip() != "" for t in b["text"]],
                batched=True,
                num_proc=num_proc,
            )
        except CorpusError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the source named
            raise _corpus_error(source, e) from e
        ds = group_rows(ds, (group or {}).get(source.spec, 1))
        parts.append(ds)
        if prov is not None:
            provenance.append(prov)
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(ds) == 0:
        raise CorpusError(f"the corpus is empty: no non-blank documents in {[s.spec for s in parsed]}")
    return ds, provenance


def load_documents(sources: str | Sequence[str], text_field: str | None = None):
    """Documents from text files (one a line), jsonl/parquet files or datasets, as a ``text`` Dataset.

    Blank documents are dropped. Raises :class:`CorpusError` for an empty corpus or undecodable bytes."""
    return load_corpus(sources, text_field)[0]


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


def _tokenize(docs, tokenizer, num_proc: int | None):
    """Each document's token ids (no special tokens), in a column ``ids``; per document, so the
    result is the same for any ``num_proc``."""

    def encode(batch):
        enc = tokenizer(batch["text"], add_special_tokens=False, truncation=False, verbose=False)
        return {"ids": enc["input_ids"]}

    return docs.map(
        encode, batched=True, remove_columns=docs.column_names, num_proc=num_proc, desc="tokenizing"
    )


def _packer(cls_id: int, sep_id: int, pad_id: int, max_length: int):
    """``[CLS] doc [SEP] doc [SEP] ...`` pieces of one batch of tokenized documents (arrow in, numpy out)."""
    piece = max_length - 1

    def pack(batch):
        ids = batch["ids"].combine_chunks() if hasattr(batch["ids"], "combine_chunks") else batch["ids"]
        offsets = np.asarray(ids.offsets, dtype=np.int64)
        values = np.asarray(ids.flatten(), dtype=np.int64)
        offsets -= offsets[0]
        ends = offsets[1:][np.diff(offsets) > 0]  # a [SEP] after each non-empty document
        stream = np.insert(values, ends, sep_id)
        n_seq = -(-len(stream) // piece)
        out = np.full((n_seq, max_length), pad_id, dtype=np.int64)
        out[:, 0] = cls_id
        body = np.full(n_seq * piece, pad_id, dtype=np.int64)
        body[: len(stream)] = stream
        out[:, 1:] = body.reshape(n_seq, piece)
        lengths = 1 + np.minimum(piece, len(stream) - piece * np.arange(n_seq, dtype=np.int64))
        return {"input_ids": out, "length": lengths}

    return pack


def _degenerate(tokenizer, min_tokens: int, max_unk_fraction: float):
    """Flags of the sequences DistilBERT's preparation drops: too short, or mostly [UNK]."""
    unk_id = tokenizer.unk_token_id
    special = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)

    def flag(batch):
        ids = np.asarray(batch["input_ids"], dtype=np.int64)
        n = np.asarray(batch["length"], dtype=np.int64)
        short = n <= min_tokens
        if unk_id is None:
            return {"_short": short, "_unk": np.zeros_like(short)}
        is_unk = ids == unk_id
        real = (np.arange(ids.shape[1])[None, :] < n[:, None]) & (~np.isin(ids, special) | is_unk)
        n_real, n_unk = real.sum(1), (real & is_unk).sum(1)
        unk = (n_real > 0) & (n_unk > max_unk_fraction * n_real)
        return {"_short": short, "_unk": unk & ~short}

    return flag


def _drop_degenerate(packed, tokenizer, min_tokens: int, max_unk_fraction: float, num_proc: int | None):
    """(the packed sequences without the degenerate ones, how many were too short, how many mostly unknown)."""
    flagged = (
        packed.with_format("numpy")
        .map(
            _degenerate(tokenizer, min_tokens, max_unk_fraction),
            batched=True,
            num_proc=num_proc,
            desc="filtering",
        )
        .with_format(None)
    )
    flags = flagged.select_columns(["_short", "_unk"]).with_format("numpy")
    short = unk = 0
    for b in flags.iter(batch_size=65536):
        short += int(np.sum(b["_short"]))
        unk += int(np.sum(b["_unk"]))
    result = flagged.filter(
        lambda b: [not (s or u) for s, u in zip(b["_short"], b["_unk"], strict=True)],
        batched=True,
        num_proc=num_proc,
    ).remove_columns(["_short", "_unk"])
    return result, short, unk


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
    num_proc: int | None = None,
):
    """Tokenize and pack documents into ``[CLS] doc [SEP] doc [SEP] ...`` sequences of ``max_length``.

    Returns an arrow-backed Dataset with columns ``input_ids`` (``max_length`` ints, padded with
    the pad id) and ``length`` (number of real tokens). Degenerate sequences are filtered out.
    Tokenizing and filtering run in ``num_proc`` processes; packing runs in one, over fixed
    batches of ``pack_batch_documents``, so the sequences are the same for any ``num_proc``.
    """
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    if cls_id is None or sep_id is None or pad_id is None:
        raise ValueError("the tokenizer needs [CLS], [SEP] and [PAD] tokens for packing")
    if max_length < 4:
        raise ValueError("max_length must be at least 4")
    num_proc = num_proc if num_proc and num_proc > 1 else None
    docs = documents.shuffle(seed=seed) if shuffle else documents
    tokenized = _tokenize(docs, tokenizer, num_proc).with_format("arrow")
    packed = tokenized.map(
        _packer(cls_id, sep_id, pad_id, max_length),
        batched=True,
        batch_size=pack_batch_documents,
        remove_columns=tokenized.column_names,
        desc="packing",
    ).with_format(None)
    result, short, unk = _drop_degenerate(packed, tokenizer, min_tokens, max_unk_fraction, num_proc)
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
    group: dict[str, int] | None = None,
    num_proc: int | None = None,
):
    """load -> group rows -> holdout -> pack -> filter. Returns (packed Dataset, CorpusStats)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [str(s) for s in sources]
    stats = CorpusStats(sources=sources, text_field=text_field or "text", group_rows=dict(group or {}))
    docs, stats.datasets = load_corpus(sources, text_field=text_field, group=group, num_proc=num_proc)
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
    packed = pack_sequences(kept, tokenizer, max_length=max_length, seed=seed, stats=stats, num_proc=num_proc)
    if len(packed) == 0:
        raise CorpusError(f"no sequences left after filtering degenerate ones from {sources}")
    return packed, stats
