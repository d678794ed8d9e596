"""The trainer's fused output layer (the default) against the unfused reference path (`--no-fused-head`): the
same losses and the same weights after a few steps, for the exact and the top-k source, under ZeRO 0 and 3;
the checkpoints and the export are the student alone, as unfused; a model whose logits are not its output
layer on its features is trained unfused (tiny teacher and store, real DeepSpeed engines)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import restore_process_state

ROOT = Path(__file__).resolve().parents[1]
TINY_DS = ROOT / "offline_kd" / "configs" / "ds_cpu_tiny.json"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "offline_kd" / "torch_extensions"))

_restore_process_state = pytest.fixture(scope="module", autouse=True)(restore_process_state)


def _ds(tmp_path: Path, stage: int) -> Path:
    ds = json.loads(TINY_DS.read_text())
    ds["zero_optimization"] = {"stage": stage}
    path = tmp_path / f"ds{stage}.json"
    path.write_text(json.dumps(ds))
    return path


def _train(store, out, ds, **loss):
    from offline_kd.runtime.options import from_fields
    from offline_kd.train.loop import TrainConfig, train
    from offline_kd.train.loss import LossConfig

    cfg = from_fields(
        TrainConfig, store=str(store), student="distil", output=str(out), deepspeed_config=str(ds),
        progress=False, tensorboard=False, max_steps=4, epochs=1, loss=LossConfig(**loss),
    )  # fmt: skip
    return train(cfg)


def _rows(out: Path) -> list[dict]:
    from offline_kd.train.metrics import read_csv

    return read_csv(out / "logs" / "metrics.csv")


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("source", ["exact", "topk"])
def test_fused_trains_like_the_unfused_reference(tiny_store, tmp_path, source, stage):
    """fp32 on CPU, the fp32 teacher head on both sides: the two paths differ only in summation order."""
    ds = _ds(tmp_path, stage)
    loss = dict(kl_source=source, teacher_head_dtype="float32")
    _train(tiny_store, tmp_path / "fused", ds, **loss)
    _train(tiny_store, tmp_path / "unfused", ds, fused_head=False, **loss)
    fused, unfused = _rows(tmp_path / "fused"), _rows(tmp_path / "unfused")
    assert len(fused) == len(unfused) == 4
    for a, b in zip(fused, unfused, strict=True):
        for col in ("loss", "kl", "mlm", "cos"):
            assert float(a[col]) == pytest.approx(float(b[col]), rel=1e-4, abs=1e-6), (col, a, b)
    wf, wu = _weights(tmp_path / "fused"), _weights(tmp_path / "unfused")
    assert wf.keys() == wu.keys() and all(wf[k].shape == wu[k].shape for k in wf)  # the export is unchanged
    moved = [k for k in wf if not torch.equal(wf[k], wu[k])]
    assert moved  # summation order differs, so the comparison below is not vacuous ...
    for k in wf:  # ... but only by rounding
        torch.testing.assert_close(wf[k], wu[k], rtol=1e-3, atol=1e-4)


def test_fused_run_saves_the_student_alone(tiny_store, tmp_path):
    out = tmp_path / "r"
    from offline_kd.runtime.options import from_fields
    from offline_kd.train.loop import TrainConfig, train

    train(
        from_fields(
            TrainConfig,
            store=str(tiny_store),
            student="distil",
            output=str(out),
            deepspeed_config=str(TINY_DS),
            progress=False,
            tensorboard=False,
            max_steps=2,
            save_every=2,
        )  # fmt: skip
    )
    (states,) = sorted((out / "checkpoints").glob("step*/mp_rank_00_model_states.pt"))
    saved = torch.load(states, map_location="cpu", weights_only=True)
    assert all(k.startswith("student.") for k in saved["module"])
    assert not any(k.startswith("output_layer") for k in saved["module"])


def test_distilbert_students_are_fusable(tiny_teacher):
    from offline_kd.train.output_layer import features_instead_of_logits, fusable, output_layer
    from offline_kd.train.student import build_student

    bundle = build_student("distil", teacher_path=str(tiny_teacher), vocab_size=0, max_positions=512)
    model = bundle.model
    assert fusable(model, bundle.true_vocab_size) is None
    layer = output_layer(model)
    ids = torch.tensor([[2, 5, 9, 3]])
    with features_instead_of_logits(layer):
        feats = model(input_ids=ids).logits
    assert feats.shape[-1] == layer.in_features
    assert "forward" not in vars(layer)  # the layer is itself again afterwards
    assert model(input_ids=ids).logits.shape[-1] == layer.out_features


def test_a_model_that_post_processes_its_logits_is_not_fusable(tiny_teacher):
    from offline_kd.train.output_layer import fusable
    from offline_kd.train.student import build_student

    bundle = build_student("distil", teacher_path=str(tiny_teacher), vocab_size=0, max_positions=512)
    model = bundle.model
    inner = model.forward

    def capped(*args, **kwargs):  # e.g. a logit soft-cap applied after the output layer
        out = inner(*args, **kwargs)
        out.logits = 30 * torch.tanh(out.logits / 30)
        return out

    model.forward = capped
    assert "differ" in fusable(model, bundle.true_vocab_size)
