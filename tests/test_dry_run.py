"""`kd precompute --dry-run` (sampled estimate, no weights, free space) and store URL handling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_FLAGS, make_documents, run_tiny_precompute

from offline_kd.cli.kd import main as kd
from offline_kd.store.signal_store import StoreError
from offline_kd.store.storage import StorageError, check_store_url, parse_options, redact, split_url


@pytest.fixture(scope="module")
def big_docs() -> list[str]:
    return make_documents(800, seed=1)


@pytest.fixture(scope="module")
def shape_only_teacher(tiny_teacher, tmp_path_factory) -> Path:
    """The tiny teacher's config and tokenizer without its weights: all a dry run may read."""
    out = tmp_path_factory.mktemp("shape") / "teacher"
    shutil.copytree(tiny_teacher, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return out


def _real_sequences(teacher: Path, sources: list[str], text_field: str | None = None, holdout: float = 0.0):
    """What precompute would pack: every document tokenized (the slow path the dry run avoids)."""
    from transformers import AutoTokenizer

    from offline_kd.data.corpus import prepare_corpus

    tok = AutoTokenizer.from_pretrained(teacher)
    packed, _ = prepare_corpus(sources, tok, max_length=32, text_field=text_field, holdout_fraction=holdout)
    return len(packed), int(sum(packed["length"]))


def _write(tmp_path: Path, docs: list[str], kind: str) -> Path:
    if kind == "txt":
        p = tmp_path / "c.txt"
        p.write_text("\n".join(docs) + "\n", encoding="utf-8")
    elif kind == "jsonl":
        p = tmp_path / "c.jsonl"
        p.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)), "utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / "c.parquet"
        pq.write_table(pa.table({"body": docs}), p, row_group_size=100)
    return p


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_estimate_from_a_sample_is_close_to_the_real_count(kind, big_docs, shape_only_teacher, tmp_path):
    corpus = _write(tmp_path, big_docs, kind)
    field = None if kind == "txt" else "body"
    real_n, real_tokens = _real_sequences(shape_only_teacher, [str(corpus)], field, holdout=0.1)
    r = run_tiny_precompute(
        shape_only_teacher, corpus, tmp_path / "dry.zarr", dry_run=True, dry_run_documents=100,
        text_field=field, holdout=0.1,
    )  # fmt: skip
    sample = r.estimate.samples[0]
    assert not sample.whole and len(sample.documents) == 100  # an eighth of the corpus was read
    assert abs(r.num_sequences - real_n) / real_n < 0.05, (r.num_sequences, real_n)
    assert abs(r.tokens - real_tokens) / real_tokens < 0.05, (r.tokens, real_tokens)
    assert not (tmp_path / "dry.zarr").exists()


def test_estimate_for_a_dataset_directory_with_grouped_rows(big_docs, shape_only_teacher, tmp_path):
    """A dataset with a sentence a row, joined 8 at a time: sampled and scaled by rows as precompute packs it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from offline_kd.data.corpus import prepare_corpus

    (tmp_path / "ds").mkdir()
    sentences = [s.strip() + "." for d in big_docs for s in d.split(".") if s.strip()]
    pq.write_table(pa.table({"text": sentences}), tmp_path / "ds" / "train.parquet")
    source, group = str(tmp_path / "ds"), {str(tmp_path / "ds"): "8"}
    tok = AutoTokenizer.from_pretrained(shape_only_teacher)
    packed, _ = prepare_corpus([source], tok, max_length=32, group={source: 8})
    real_n = len(packed)
    r = run_tiny_precompute(
        shape_only_teacher,
        source,
        tmp_path / "dry.zarr",
        dry_run=True,
        dry_run_documents=800,
        group_rows=group,
    )
    sample = r.estimate.samples[0]
    assert len(sample.documents) == 100 and f"first 800 of {len(sentences):,} rows" in sample.how
    assert abs(r.num_sequences - real_n) / real_n < 0.05, (r.num_sequences, real_n)


def test_whole_corpus_sample_is_exact_and_cli_reports_it(
    tiny_store, shape_only_teacher, tiny_corpus, tmp_path
):
    from offline_kd.store.signal_store import SignalStore

    meta = SignalStore.open(str(tiny_store)).meta
    out = tmp_path / "dry.zarr"
    argv = [
        "precompute",
        "--teacher",
        str(shape_only_teacher),
        "--corpus",
        str(tiny_corpus),
        "--output",
        str(out),
    ]
    r = CliRunner().invoke(kd, argv + TINY_FLAGS + ["--dry-run"])
    assert r.exit_code == 0, r.output
    assert f"corpus {tiny_corpus}: read whole" in r.output
    assert f"\n{meta.num_sequences:,} sequences, " in r.output and f"{meta.num_shards} shards" in r.output
    assert f"free at {tmp_path}: enough" in r.output and "no teacher weights loaded" in r.output
    assert not out.exists()


def test_dry_run_refuses_a_local_disk_without_room(shape_only_teacher, tiny_corpus, tmp_path, monkeypatch):
    import offline_kd.store.storage

    real = shutil.disk_usage
    monkeypatch.setattr(offline_kd.store.storage.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(StoreError, match=r"not enough disk space for .*dry.zarr.*0\.00 GB free"):
        run_tiny_precompute(shape_only_teacher, tiny_corpus, tmp_path / "dry.zarr", dry_run=True)


def test_dry_run_checks_the_inputs_like_a_run(shape_only_teacher, tiny_corpus, tmp_path):
    """The same refusals as a real run, except that a teacher without weights is fine."""
    from offline_kd.data.corpus import CorpusError
    from offline_kd.runtime.errors import UsageError

    with pytest.raises(UsageError, match=r"--teacher .*no_teacher: no such directory"):
        run_tiny_precompute(tmp_path / "no_teacher", tiny_corpus, tmp_path / "d.zarr", dry_run=True)
    with pytest.raises(CorpusError, match=r"corpus file '.*missing.txt' does not exist"):
        run_tiny_precompute(shape_only_teacher, tmp_path / "missing.txt", tmp_path / "d.zarr", dry_run=True)
    with pytest.raises(UsageError, match=r"--teacher .*: no weights"):
        run_tiny_precompute(shape_only_teacher, tiny_corpus, tmp_path / "d.zarr")  # without --dry-run


# ------------------------------------------------------------------------- store URLs


def test_storage_options_are_typed_and_nested():
    opts = parse_options(
        {"anon": "true", "max_concurrency": "8", "client_kwargs.region_name": "eu-west-1",
         "config_kwargs.retries.max_attempts": "1", "endpoint_url": "http://h:9000/?a=b", "x": "{\"a\": 1}"}
    )  # fmt: skip
    assert opts == {
        "anon": True, "max_concurrency": 8, "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}}, "endpoint_url": "http://h:9000/?a=b", "x": {"a": 1},
    }  # fmt: skip
    assert parse_options(None) == {} and parse_options({"anon": False}) == {"anon": False}
    with pytest.raises(StorageError, match="already set"):
        parse_options({"a": "1", "a.b": "2"})
    assert redact({"key": "AK", "secret": "S", "endpoint_url": "u", "client_kwargs.aws_session_token": "T"}) == {
        "key": "***", "secret": "***", "endpoint_url": "u", "client_kwargs.aws_session_token": "***",
    }  # fmt: skip


def test_local_store_urls(tmp_path):
    assert split_url(str(tmp_path)) == ("file", str(tmp_path))
    assert split_url(f"file://{tmp_path}/s.zarr") == ("file", f"{tmp_path}/s.zarr")
    check_store_url(f"file://{tmp_path}/new/s.zarr", writing=True)  # a missing store under a directory
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match=r"store '.*f/s.zarr': '.*f' is a file, not a directory"):
        check_store_url(str(tmp_path / "f" / "s.zarr"), writing=True)
    with pytest.raises(StorageError, match="unknown URL scheme 'nosuch'"):
        check_store_url("nosuch://b/s.zarr")
    check_store_url("memory://kd/s.zarr")  # no bucket to check
