"""`kd precompute`, `kd inspect --json` and `kd verify` through click's CliRunner."""

from __future__ import annotations

import json
import shutil

import numpy as np
import zarr
from click.testing import CliRunner
from conftest import TINY_FLAGS, assert_same_store

from offline_kd.cli.kd import main
from offline_kd.store.signal_store import SignalStore

INSPECT_KEYS = {
    "sequences",
    "tokens",
    "top_k",
    "views",
    "vocab_size",
    "teacher",
    "complete",
    "bytes",
    "bytes_per_token",
}


def test_precompute_cli_equals_library(tmp_path, tiny_store, tiny_teacher, tiny_corpus):
    out = tmp_path / "cli.zarr"
    args = ["precompute", "--teacher", str(tiny_teacher), "--corpus", str(tiny_corpus), "--output", str(out)]
    r = CliRunner().invoke(main, args + TINY_FLAGS)
    assert r.exit_code == 0, r.output
    assert "complete" in r.output
    assert_same_store(out, tiny_store)
    r = CliRunner().invoke(main, args + TINY_FLAGS + ["--dry-run"])
    assert r.exit_code == 0 and "estimated store size" in r.output
    r = CliRunner().invoke(main, args + TINY_FLAGS[:-1] + ["--top-k", "4"])
    assert r.exit_code != 0 and "top_k" in r.output and "--overwrite" in r.output


def test_inspect_json(tiny_store):
    r = CliRunner().invoke(main, ["inspect", str(tiny_store), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert INSPECT_KEYS <= set(info)
    g = zarr.open_group(str(tiny_store), mode="r")
    assert info["sequences"] == g["lengths"].shape[0]
    assert info["tokens"] == int(g["lengths"][:].sum())
    assert (info["top_k"], info["views"], info["complete"]) == (8, 2, True)
    assert info["bytes"] > 0 and abs(info["bytes_per_token"] - info["bytes"] / info["tokens"]) < 1e-9
    assert info["teacher"]["weights_sha256"]
    r = CliRunner().invoke(main, ["inspect", str(tiny_store)])
    assert r.exit_code == 0 and "complete" in r.output and "top-8" in r.output


def test_verify_ok_and_with_teacher(tiny_store, tiny_teacher):
    r = CliRunner().invoke(main, ["verify", str(tiny_store)])
    assert r.exit_code == 0, r.output
    assert "OK" in r.output
    r = CliRunner().invoke(
        main, ["verify", str(tiny_store), "--teacher", str(tiny_teacher), "--sample", "3", "--json"]
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["ok"] and len(rep["sampled_sequences"]) == 3
    assert rep["teacher_max_abs_diff"]["topk_logits"] < 1e-4


def test_verify_detects_corruption(tmp_path, tiny_store):
    out = tmp_path / "bad.zarr"
    shutil.copytree(tiny_store, out)
    f = out / "hidden" / "c" / "0" / "2" / "0" / "0"
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x55
    f.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 1
    assert "'hidden'" in r.output and "shard 2" in r.output and "view 0" in r.output


def test_verify_detects_bad_values_and_incomplete(tmp_path, tiny_store):
    out = tmp_path / "vals.zarr"
    shutil.copytree(tiny_store, out)
    g = zarr.open_group(str(out), mode="r+")
    lse = g["lse"]
    block = lse[1, 8:16]
    block[3, 0, 0] = np.nan
    lse[1, 8:16] = block
    # as if written so: the commit records the digests of the chunk as it is now
    SignalStore.open(str(out), mode="r+").mark_committed(1)
    g["committed"][4] = 0
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 1
    assert "view 1, sequence 11: lse has NaN/inf" in r.output
    assert "incomplete" in r.output and "[4]" in r.output
