"""The trained student as a user receives it: ``DIR/final`` and its model card.

``final/`` holds a ``save_pretrained`` fp32 student and its tokenizer (loadable with
``AutoModelForMaskedLM`` and ``pipeline("fill-mask")``), the exact ``train_config.json`` and
resolved ``ds_config.json``, and a ``README.md`` model card (`offline_kd.publish.model_card`); with
``--push-to-hub REPO`` rank 0 uploads it. A learned hidden projection is training-only: it goes to
``DIR/projection.safetensors``, never into the exported model.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from offline_kd.publish.model_card import CardInputs, build_card
from offline_kd.runtime.distributed import barrier
from offline_kd.runtime.errors import DiskFull, is_disk_full
from offline_kd.store.storage import redact
from offline_kd.train.student import StudentBundle

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from offline_kd.runtime.settings import TrainConfig
    from offline_kd.store.signal_store import StoreMeta


def gathered_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copy of a module's state dict on every rank (gathers ZeRO-3 partitions)."""
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def params_sha256(state: dict[str, torch.Tensor]) -> str:
    """One hash of every tensor (by name): equal on ranks that hold identical parameters."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def export_student(
    bundle: StudentBundle, state: dict[str, torch.Tensor], out_dir: Path
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """save_pretrained an fp32 copy of the student built from `state` + its tokenizer.

    Returns the exported model and the projection's tensors (empty without a projection).
    """
    student_state = {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
    config = copy.deepcopy(bundle.model.config)
    model = type(bundle.model)(config).float()
    missing, unexpected = model.load_state_dict(student_state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise RuntimeError(f"export: missing={missing} unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if bundle.true_vocab_size != model.config.vocab_size:  # trim the training-time padding rows
        model.resize_token_embeddings(bundle.true_vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tok = copy.deepcopy(bundle.tokenizer)
    # DistilBERT-style students take no token_type_ids; keep pipelines from passing them.
    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        tok.model_input_names = [n for n in tok.model_input_names if n != "token_type_ids"]
        tok.init_kwargs["model_input_names"] = tok.model_input_names
    tok.save_pretrained(str(out_dir))
    proj = {k[len("projection.") :]: v for k, v in state.items() if k.startswith("projection.")}
    return model, proj


def redacted_settings(cfg: TrainConfig) -> dict:
    """The run's settings as a dict, credentials left out."""
    settings = cfg.as_dict()
    settings["storage_options"] = redact(settings.get("storage_options"))
    return settings


def write_run_config(out_dir: Path, cfg: TrainConfig, ds: dict) -> None:
    """The exact settings of a run: ``train_config.json`` and the resolved ``ds_config.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_config.json").write_text(json.dumps(redacted_settings(cfg), indent=2) + "\n")
    (out_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")


def push_to_hub(final_dir: Path, repo_id: str) -> str:
    """Upload ``final/`` to a hub model repository (created when missing); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    info = api.upload_folder(
        folder_path=str(final_dir), repo_id=repo_id, repo_type="model", commit_message="offline_kd student"
    )
    return str(getattr(info, "commit_url", info))


def write_final(
    out: Path,
    cfg: TrainConfig,
    meta: StoreMeta,
    bundle: StudentBundle,
    ds: dict,
    metrics: dict,
    steps: int,
    state: dict[str, torch.Tensor],
) -> None:
    """Rank 0's export: ``DIR/final`` (student, tokenizer, configs, card) and the projection, if any."""
    final_dir = out / "final"
    # Written under another name and renamed when whole: a crash or a full disk never leaves a final/ that
    # looks finished.
    partial = out / "final.partial"
    shutil.rmtree(partial, ignore_errors=True)
    _, proj = export_student(bundle, state, partial)
    if proj:
        from safetensors.torch import save_file

        tmp = out / "projection.safetensors.partial"
        save_file(proj, str(tmp))
        os.replace(tmp, out / "projection.safetensors")
    write_run_config(partial, cfg, ds)
    ref = cfg.card.push_to_hub or str(final_dir.resolve())
    heldout = metrics.get("eval") and {**metrics["eval"], "source": cfg.heldout.eval_corpus}
    name = (cfg.card.push_to_hub or str(out.resolve())).rstrip("/").split("/")[-1]
    inputs = CardInputs(ref, name, steps, metrics.get("train") or {}, heldout)
    build_card(cfg, meta, bundle, ds, inputs).save(partial / "README.md")
    if final_dir.exists():  # a resumed finished run exports again
        shutil.rmtree(final_dir)
    os.replace(partial, final_dir)


def disk_full_on_export(out: Path) -> DiskFull:
    """The one line of an export that ran out of space: what is left of final/ and how to export again."""
    from offline_kd.train.checkpoint import latest_complete

    final_dir = out / "final"
    kept = "the earlier final/ is left as it was" if final_dir.exists() else "no final/ was written"
    tag = latest_complete(out / "checkpoints")
    then = (
        f"rerun the same command with --resume to export the student of checkpoint {tag}"
        if tag
        else "rerun the same command (no checkpoint was saved: it trains again)"
    )
    return DiskFull(f"disk full while exporting to {final_dir}; {kept}: free space and {then}")


def export_run(
    module: nn.Module,
    cfg: TrainConfig,
    meta: StoreMeta,
    bundle: StudentBundle,
    ds: dict,
    metrics: dict,
    steps: int,
    rank: int,
) -> Path:
    """Gather the trained module on every rank; rank 0 writes ``DIR/final``; return its path.

    Every rank returns once ``final/`` is written. With ``cfg.logs.debug_param_hash`` each rank also
    writes a hash of its gathered parameters (equal on every rank when ZeRO kept them in sync).
    """
    out = Path(cfg.output)
    state = gathered_state_dict(module)
    if cfg.logs.debug_param_hash:
        dbg = out / "debug"
        dbg.mkdir(parents=True, exist_ok=True)
        (dbg / f"params_rank{rank}.sha256").write_text(params_sha256(state) + "\n")
    final_dir = out / "final"
    if rank == 0:
        try:
            write_final(out, cfg, meta, bundle, ds, metrics, steps, state)
        except Exception as e:
            if not is_disk_full(e):
                raise
            shutil.rmtree(out / "final.partial", ignore_errors=True)
            (out / "projection.safetensors.partial").unlink(missing_ok=True)
            raise disk_full_on_export(out) from None
        if cfg.card.push_to_hub:
            log.info("pushed %s: %s", final_dir, push_to_hub(final_dir, cfg.card.push_to_hub))
    barrier()
    return final_dir
