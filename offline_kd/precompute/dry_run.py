"""``kd precompute --dry-run``: the store's size from a sample of the corpus, and what can be checked
without writing anything.

The dry run reads the teacher's config and tokenizer (no weights), tokenizes and packs the first
``dry_run_documents`` documents of each corpus source exactly as precompute would (hold-out,
packing, filters) and extrapolates to the whole source by bytes: the sample's bytes against the
file's size for text and JSON-lines files, against the text column's uncompressed size (from the
footer) for parquet files; datasets by rows (their metadata gives the row count). A source smaller
than the sample is packed whole. Free space is
checked for a local store; a remote store's free space cannot be known, and the estimate says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from offline_kd.data.corpus import CorpusError, pack_sequences, split_holdout
from offline_kd.data.sources import CorpusSource, check_group_rows, load_source, parse_source
from offline_kd.runtime.settings import PrecomputeConfig
from offline_kd.store.signal_store import StoreError, estimate_bytes_per_token, num_shards_for
from offline_kd.store.storage import free_space
from offline_kd.teacher.model import load_teacher_shape


@dataclass
class SourceSample:
    """The first documents of one corpus source and how much of the source they are."""

    source: str
    documents: list[str]
    scale: float  # the source's size over the sample's, by `basis`
    how: str  # how much of the source the sample is, for the report

    @property
    def whole(self) -> bool:
        return self.scale == 1.0


@dataclass
class DryRunEstimate:
    """What ``--dry-run`` reports: sequences, tokens, shards, bytes, and the free space it found."""

    output: str
    sequences: int
    tokens: int  # real (non-padding) tokens
    num_shards: int
    bytes: int  # uncompressed upper bound of every array with a position axis
    samples: list[SourceSample] = field(default_factory=list)
    free_bytes: int | None = None  # None: remote store, not checkable
    free_at: str | None = None

    def lines(self) -> list[str]:
        approx = "" if all(s.whole for s in self.samples) else "~"
        out = [f"corpus {s.source}: {s.how}" for s in self.samples]
        out.append(
            f"{approx}{self.sequences:,} sequences, {approx}{self.tokens:,} tokens, {self.num_shards} shards; "
            f"estimated store size {_human(self.bytes)} (uncompressed upper bound)"
        )
        if self.free_bytes is None:
            out.append(
                f"free space cannot be checked for the remote store {self.output!r}: make sure it has room"
            )
        else:
            out.append(f"{_human(self.free_bytes)} free at {self.free_at}: enough")
        return out


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


# ------------------------------------------------------------------------------------ sampling


def _read_lines(source: str, n: int) -> tuple[list[bytes], int, int]:
    """The first ``n`` non-blank lines of a (local or fsspec) file, the bytes read for them
    (blank lines included) and the file's size."""
    import fsspec

    try:
        opened = fsspec.open(source, "rb")
        size = opened.fs.size(opened.path)
        with opened as f:
            lines, used = [], 0
            for raw in f:
                used += len(raw)
                if raw.strip():
                    lines.append(raw)
                    if len(lines) == n:
                        break
    except FileNotFoundError as e:
        raise CorpusError(f"corpus file {source!r} does not exist") from e
    return lines, used, int(size)


def _decode(source: str, lines: list[bytes]) -> list[str]:
    out = []
    for raw in lines:
        try:
            out.append(raw.decode("utf-8").strip())
        except UnicodeDecodeError as e:
            raise CorpusError(f"corpus file {source!r} is not valid UTF-8 in its first documents: {e}") from e
    return out


def _sample_text_or_jsonl(source: str, kind: str, field_name: str, n: int) -> SourceSample:
    lines, used, size = _read_lines(source, n)
    texts = _decode(source, lines)
    if kind == "json":
        try:
            records = [json.loads(t) for t in texts]
        except json.JSONDecodeError as e:
            raise CorpusError(f"{source!r}: the dry run reads JSON lines (one record a line): {e}") from e
        missing = [r for r in records if not isinstance(r, dict) or field_name not in r]
        if missing:
            raise CorpusError(f"corpus source {source!r} has no field {field_name!r}; pass --text-field")
        texts = [r[field_name] for r in records]
    docs = [t for t in texts if isinstance(t, str) and t.strip()]
    scale = size / used if used and used < size else 1.0
    how = f"first {len(lines):,} documents ({used / size:.1%} of its bytes), scaled by bytes"
    return SourceSample(source, docs, scale, "read whole" if scale == 1.0 else how)


def _sample_parquet(source: str, field_name: str, n: int) -> SourceSample:
    """The first ``n`` rows of a parquet file, scaled by the text column's uncompressed size in the
    file's metadata (a string value costs its bytes + 4 there), else by the row count."""
    import fsspec
    import pyarrow.parquet as pq

    try:
        with fsspec.open(source, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if field_name not in names:
                raise CorpusError(
                    f"corpus source {source!r} has no field {field_name!r} (columns: {names}); pass --text-field"
                )
            md, col = pf.metadata, pf.schema_arrow.get_field_index(field_name)
            column_bytes = sum(
                md.row_group(i).column(col).total_uncompressed_size for i in range(md.num_row_groups)
            )
            batch = next(pf.iter_batches(batch_size=n, columns=[field_name]), None)
    except FileNotFoundError as e:
        raise CorpusError(f"corpus file {source!r} does not exist") from e
    texts = batch.column(0).to_pylist() if batch is not None else []
    docs = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts or len(texts) >= md.num_rows:
        return SourceSample(source, docs, 1.0, "read whole")
    sample_bytes = sum(4 + len(t.encode()) for t in texts if isinstance(t, str))
    if column_bytes and sample_bytes:
        how = f"first {len(texts):,} of {md.num_rows:,} rows, scaled by the text column's bytes"
        return SourceSample(source, docs, column_bytes / sample_bytes, how)
    how = f"first {len(texts):,} of {md.num_rows:,} rows, scaled by rows"
    return SourceSample(source, docs, md.num_rows / len(texts), how)


def _sample_dataset(source: CorpusSource, field_name: str, n: int) -> SourceSample:
    """The first rows of a dataset (hub or directory; streamed) and its row count."""
    import datasets

    spec, split = source.spec, source.split
    try:
        ds = datasets.load_dataset(
            source.path, source.config, split=split, streaming=True, revision=source.revision
        )
        texts = [row[field_name] for row in ds.take(n)]
        info = (
            ds.info.splits
            or datasets.load_dataset_builder(source.path, source.config, revision=source.revision).info.splits
        )
    except KeyError as e:
        raise CorpusError(f"dataset {spec!r} has no field {field_name!r}; pass --text-field") from e
    except Exception as e:  # noqa: BLE001 - hub, network and format errors, in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CorpusError(f"could not read dataset {spec!r}: {first}") from e
    rows = info[split].num_examples if info and split in info else None
    if not rows and not source.is_hub:  # a local directory: its files give the count
        rows = len(load_source(source)[0])
    if not rows:
        raise CorpusError(f"dataset {spec!r} does not publish its row count; the dry run cannot scale")
    docs = [t for t in texts if isinstance(t, str) and t.strip()]
    scale = rows / len(texts) if texts and len(texts) < rows else 1.0
    how = f"first {len(texts):,} of {rows:,} rows, scaled by rows"
    return SourceSample(spec, docs, scale, "read whole" if scale == 1.0 else how)


def sample_source(spec: str, text_field: str | None, n: int, group_rows: int = 1) -> SourceSample:
    """The first ``n`` documents of a corpus source (file, fsspec URL or dataset), its rows joined
    ``group_rows`` at a time as precompute joins them (the scale is the same for groups as for rows)."""
    field_name = text_field or "text"
    source = parse_source(spec)
    if source.kind == "dataset":
        sample = _sample_dataset(source, field_name, n)
    elif source.kind == "parquet":
        sample = _sample_parquet(source.path, field_name, n)
    else:
        sample = _sample_text_or_jsonl(source.path, source.kind, field_name, n)
    if group_rows > 1:
        docs = sample.documents
        sample.documents = [" ".join(docs[i : i + group_rows]) for i in range(0, len(docs), group_rows)]
    return sample


# ------------------------------------------------------------------------------------ estimate


def dry_run(cfg: PrecomputeConfig) -> DryRunEstimate:
    """Estimate the store of ``cfg`` from its teacher's config and a corpus sample; refuse a local
    output without room for it. Writes nothing and loads no weights."""
    import datasets

    if cfg.dry_run_documents < 1:
        raise ValueError("dry_run_documents must be >= 1")
    # top_k and max_length against the config were checked with the other inputs (offline_kd.precompute.checks)
    config, tokenizer = load_teacher_shape(cfg.teacher, cfg.revision, cfg.trust_remote_code)
    group = check_group_rows(cfg.group_rows, cfg.corpus)
    samples = [
        sample_source(str(s), cfg.text_field, cfg.dry_run_documents, group.get(str(s), 1)) for s in cfg.corpus
    ]
    sequences = tokens = 0.0
    quiet = not datasets.utils.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()  # a bar per sample would bury the estimate
    try:
        for sample in samples:
            kept, _ = split_holdout(
                datasets.Dataset.from_dict({"text": sample.documents}), cfg.holdout, cfg.seed
            )
            if len(kept):
                packed = pack_sequences(kept, tokenizer, max_length=cfg.max_length, seed=cfg.seed)
                sequences += sample.scale * len(packed)
                tokens += sample.scale * int(sum(packed["length"]))
    finally:
        if quiet:
            datasets.enable_progress_bars()
    if sequences == 0:
        raise CorpusError(f"no sequences left after packing and filtering a sample of {cfg.corpus}")
    n = max(1, math.ceil(sequences))
    bpt = estimate_bytes_per_token(
        cfg.top_k, cfg.views, len(cfg.temperatures) if cfg.top_k > 0 else 0,
        int(config.hidden_size) if cfg.hidden else None,
        int(config.vocab_size), cfg.hidden_dtype,
    )  # fmt: skip
    est = DryRunEstimate(
        cfg.output, n, int(round(tokens)), num_shards_for(n, cfg.shard_size), int(bpt * n * cfg.max_length),
        samples,
    )  # fmt: skip
    free = free_space(cfg.output)
    if free is not None:
        est.free_bytes, est.free_at = free[0], str(free[1])
        if free[0] < est.bytes:
            raise StoreError(
                f"not enough disk space for {cfg.output!r}: estimated {est.bytes / 1e9:.2f} GB, "
                f"{free[0] / 1e9:.2f} GB free at {free[1]}"
            )
    return est
