"""`kd precompute --output DIR`: a store is written only where nothing but a store is, and `--overwrite`
deletes only the store's own entries, never files a user keeps there."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from click.testing import CliRunner
from conftest import TINY_FLAGS, run_tiny_precompute, store_files

from offline_kd.cli.kd import main
from offline_kd.store.signal_store import SignalStore, StoreError


def _argv(teacher, corpus, out, *extra) -> list[str]:
    return [
        "precompute",
        "--teacher",
        str(teacher),
        "--corpus",
        str(corpus),
        "--output",
        str(out),
        *TINY_FLAGS,
        *extra,
    ]


def _kd_precompute(teacher, corpus, out, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "offline_kd.cli.kd", *_argv(teacher, corpus, out, *extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _users_files(directory: Path) -> dict[str, bytes]:
    """A user's `notes.txt` and `sub/data.bin` put in `directory`, by relative path, with their bytes."""
    files = {"notes.txt": b"the user's", "sub/data.bin": b"\x00\x01"}
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return files


def test_a_directory_that_is_not_a_store_is_refused_and_left_alone(tmp_path, tiny_teacher, tiny_corpus):
    out = tmp_path / "mine"
    before = _users_files(out)
    assert store_files(out) == before
    for extra in ([], ["--overwrite"]):
        proc = _kd_precompute(tiny_teacher, tiny_corpus, out, *extra)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[
            -3000:
        ]
        assert errors[0].startswith(
            f"Error: --output {out} is not a signal store: it holds notes.txt, sub,"
        ), errors
        assert store_files(out) == before and sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"]
        assert not Path(f"{out}.leases").exists()  # refused before the lease, the teacher and the corpus
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, _argv(tiny_teacher, tiny_corpus, empty))
    assert r.exit_code == 0, r.output
    assert SignalStore.open(str(empty)).is_complete()


def test_overwrite_deletes_the_store_and_keeps_the_users_files(
    tmp_path, tiny_store, tiny_teacher, tiny_corpus
):
    out = shutil.copytree(tiny_store, tmp_path / "store.zarr")
    users = _users_files(out)
    # resumed with the same settings: nothing to do, nothing touched
    r = CliRunner().invoke(main, _argv(tiny_teacher, tiny_corpus, out))
    assert r.exit_code == 0 and "skipped 13 already committed" in r.output, r.output
    assert store_files(out) == {**store_files(tiny_store), **users}
    r = CliRunner().invoke(main, _argv(tiny_teacher, tiny_corpus, out, "--top-k", "4", "--overwrite"))
    assert r.exit_code == 0, r.output
    assert SignalStore.open(str(out)).meta.top_k == 4
    assert all(store_files(out)[name] == data for name, data in users.items())
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 0 and "OK" in r.output, r.output


def test_an_interrupted_overwrite_is_not_resumed_and_an_overwrite_finishes_it(
    tmp_path, tiny_store, tiny_teacher, tiny_corpus
):
    """`--overwrite` deletes the commit record first: stopped right after, the store has no committed shard."""
    out = shutil.copytree(tiny_store, tmp_path / "store.zarr")
    shutil.rmtree(out / "committed")
    r = CliRunner().invoke(main, _argv(tiny_teacher, tiny_corpus, out))
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 2 and len(errors) == 1, r.output
    assert "has no commit record: an --overwrite of it was interrupted; rerun with --overwrite" in errors[0]
    r = CliRunner().invoke(main, _argv(tiny_teacher, tiny_corpus, out, "--overwrite"))
    assert r.exit_code == 0, r.output
    assert store_files(out) == store_files(tiny_store)


def test_an_fsspec_prefix_of_other_objects_is_refused_and_overwrite_keeps_them(
    tmp_path, tiny_store, tiny_teacher, tiny_corpus
):
    fs = fsspec.filesystem("memory")
    mine = f"memory://{tmp_path.name}/mine"
    fs.pipe(f"{mine}/notes.txt", b"the user's")
    meta = SignalStore.open(str(tiny_store)).meta
    for overwrite in (False, True):
        with pytest.raises(StoreError, match=f"^--output {mine} is not a signal store: it holds notes.txt,"):
            run_tiny_precompute(tiny_teacher, tiny_corpus, mine, views=1, hidden=False, overwrite=overwrite)
        with pytest.raises(StoreError, match=f"^'{mine}' is not a signal store: it holds notes.txt,"):
            SignalStore.create(mine, meta, overwrite=overwrite)  # the library refuses it too
    assert fs.find(mine) == [f"/{tmp_path.name}/mine/notes.txt"]
    store = f"memory://{tmp_path.name}/store.zarr"
    run_tiny_precompute(tiny_teacher, tiny_corpus, store, views=1, hidden=False)
    fs.pipe(f"{store}/notes.txt", b"the user's")
    r = run_tiny_precompute(tiny_teacher, tiny_corpus, store, views=1, hidden=False, top_k=4, overwrite=True)
    assert r.complete and SignalStore.open(store).meta.top_k == 4
    assert fs.cat(f"{store}/notes.txt") == b"the user's"
