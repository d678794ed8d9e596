"""The teacher pass's execution options: a torch.compile'd teacher, and on CUDA the pinned asynchronous copies
(with NaN/inf still rejected, naming the sequence, before anything of the shard is written)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_tiny_precompute, save_nan_teacher

from offline_kd.store.signal_store import SignalStore
from offline_kd.teacher.errors import TeacherFailed

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_close_stores(a, b, atol: float = 1e-4) -> None:
    """Same inputs and masks; signals equal up to kernel rounding (ids may differ only on near-ties)."""
    sa, sb = SignalStore.open(str(a)), SignalStore.open(str(b))
    n = sa.meta.num_sequences
    for view in range(min(sa.meta.views, sb.meta.views)):
        da, db = sa.read(view, 0, n), sb.read(view, 0, n)
        real = np.arange(sa.meta.max_length)[None] < da["lengths"][:, None]
        for name in ("input_ids", "masked_input_ids", "mlm_mask", "lengths"):
            np.testing.assert_array_equal(da[name], db[name])
        np.testing.assert_allclose(da["topk_logits"][real], db["topk_logits"][real], atol=atol)
        np.testing.assert_allclose(da["lse"][real], db["lse"][real], atol=atol)
        assert (da["topk_ids"][real] == db["topk_ids"][real]).mean() > 0.99
        np.testing.assert_allclose(da["hidden"][real], db["hidden"][real], atol=1e-2, rtol=1e-2)


@pytest.mark.slow
def test_compiled_teacher_writes_the_same_signals(tmp_path, tiny_store, tiny_teacher, tiny_corpus):
    out = tmp_path / "compiled.zarr"
    n = run_tiny_precompute(tiny_teacher, tiny_corpus, out, dry_run=True).num_sequences
    # one batch shape, so one compilation
    one_batch = dict(shard_size=n, chunk_size=n, batch_size=n)
    r = run_tiny_precompute(tiny_teacher, tiny_corpus, out, views=1, compile=True, **one_batch)
    assert r.complete
    assert_close_stores(out, tiny_store)


def test_compile_option_reaches_the_config(tmp_path, tiny_teacher, tiny_corpus):
    from click.testing import CliRunner

    from offline_kd.cli.commands_store import precompute_cmd

    args = [
        "--teacher",
        str(tiny_teacher),
        "--corpus",
        str(tiny_corpus),
        "--output",
        str(tmp_path / "d.zarr"),
    ]
    r = CliRunner().invoke(precompute_cmd, [*args, "--compile", "--dry-run", "--max-length", "32"])
    assert r.exit_code == 0, r.output
    assert "dry run" in r.output
    r = CliRunner().invoke(precompute_cmd, [*args, "--compile=yes"])
    assert r.exit_code == 2


@needs_cuda
def test_cuda_pass_with_pinned_copies_matches_cpu(tmp_path, tiny_store, tiny_teacher, tiny_corpus):
    out = tmp_path / "cuda.zarr"
    r = run_tiny_precompute(tiny_teacher, tiny_corpus, out, device="cuda", dtype="float32")
    assert r.complete
    assert_close_stores(out, tiny_store)


@needs_cuda
def test_cuda_nan_teacher_fails_naming_sequence_and_commits_nothing(tmp_path, tiny_teacher, tiny_corpus):
    d = save_nan_teacher(tiny_teacher, tmp_path / "nan_teacher")
    out = tmp_path / "nan.zarr"
    with pytest.raises(TeacherFailed, match=r"NaN/inf logits for sequence 0 at position 0"):
        run_tiny_precompute(d, tiny_corpus, out, device="cuda", dtype="bfloat16")
    assert not SignalStore.open(str(out)).committed().any()
