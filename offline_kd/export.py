"""The trained student as a user receives it: ``DIR/final`` and its model card.

``final/`` holds a ``save_pretrained`` fp32 student and its tokenizer (loadable with
``AutoModelForMaskedLM`` and ``pipeline("fill-mask")``), the exact ``train_config.json`` and
resolved ``ds_config.json``, and a ``README.md`` model card naming the teacher, the store, the loss
and the last metrics. A learned hidden projection is training-only: it goes to
``DIR/projection.safetensors``, never into the exported model.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from offline_kd.distributed import barrier
from offline_kd.loss import COMPONENTS
from offline_kd.storage import redact
from offline_kd.student import StudentBundle

if TYPE_CHECKING:
    from offline_kd.settings import TrainConfig
    from offline_kd.store import StoreMeta


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


def write_run_config(out_dir: Path, cfg: TrainConfig, ds: dict) -> None:
    """The exact settings of a run: ``train_config.json`` and the resolved ``ds_config.json``."""
    settings = cfg.as_dict()
    settings["storage_options"] = redact(settings.get("storage_options"))  # credentials stay out of files
    (out_dir / "train_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    (out_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")


def model_card(
    cfg: TrainConfig, meta: StoreMeta, bundle: StudentBundle, ds: dict, metrics: dict, steps: int
) -> str:
    """The ``README.md`` of ``final/``: teacher, store, student, loss, training and last metrics."""
    teacher, loss = meta.teacher or {}, cfg.loss
    if loss.kl_source == "exact":
        kl = f"KL(T={loss.temperature}, exact: full vocabulary through the teacher's MLM head)"
        signal = (
            "the teacher's encoder never ran; its MLM head recomputed the full distribution from the "
            "stored hidden states"
        )
    else:
        kl = f"KL(T={loss.temperature}, top-{meta.top_k}, tail-aware={loss.kl_tail})"
        signal = "the teacher never ran during training"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: fill-mask",
        "tags: [distillation, offline-kd]",
        "---",
        "",
        f"# Student distilled offline from `{teacher.get('name_or_path')}`",
        "",
        f"Trained with `offline_kd` from a precomputed teacher signal store ({signal}), with the DistilBERT "
        "triple loss.",
        "",
        "## Teacher",
        "",
        f"- name or path: `{teacher.get('name_or_path')}`",
        f"- weights sha256: `{teacher.get('weights_sha256')}`",
        f"- model type: `{teacher.get('model_type')}`, hidden size {meta.hidden_size}",
        "",
        "## Signal store",
        "",
        f"- url: `{cfg.store}`",
        f"- sequences: {meta.num_sequences} × max length {meta.max_length}, views {meta.views}, "
        f"top-k {meta.top_k}, temperatures {meta.temperatures}",
        f"- corpus fingerprint: `{(meta.corpus or {}).get('fingerprint')}`",
        f"- tokenizer sha256: `{meta.tokenizer_sha256}`",
        "",
        "## Student",
        "",
        f"- spec: `{cfg.student}` ({bundle.kind}), class `{type(bundle.model).__name__}`, "
        f"hidden {bundle.hidden_size}",
        f"- initialised from teacher layers: {bundle.init_layers}" if bundle.init_layers else "- random init",
        "",
        "## Loss",
        "",
        f"`{loss.alpha_kl}·{kl} + {loss.alpha_mlm}·MLM + "
        f"{loss.alpha_cos}·cosine`, KL/cosine over {'masked' if loss.restrict_kl_to_mask else 'all non-pad'} tokens.",
        "",
        "## Training",
        "",
        f"- optimizer steps: {steps}; global batch {ds['train_batch_size']} "
        f"(micro {ds['train_micro_batch_size_per_gpu']} × accumulation {ds['gradient_accumulation_steps']} "
        "× ranks)",
        f"- ZeRO stage {(ds.get('zero_optimization') or {}).get('stage', 0)}; exact settings in "
        "`train_config.json` and `ds_config.json`",
        "",
        "## Final metrics (last step)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k in (*COMPONENTS, "lr", "tokens_per_s"):
        if k in metrics:
            lines.append(f"| {k} | {metrics[k]:.6g} |")
    return "\n".join(lines) + "\n"


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

    Every rank returns once ``final/`` is written. With ``cfg.debug_param_hash`` each rank also
    writes a hash of its gathered parameters (equal on every rank when ZeRO kept them in sync).
    """
    out = Path(cfg.output)
    state = gathered_state_dict(module)
    if cfg.debug_param_hash:
        dbg = out / "debug"
        dbg.mkdir(parents=True, exist_ok=True)
        (dbg / f"params_rank{rank}.sha256").write_text(params_sha256(state) + "\n")
    final_dir = out / "final"
    if rank == 0:
        _, proj = export_student(bundle, state, final_dir)
        if proj:
            from safetensors.torch import save_file

            save_file(proj, str(out / "projection.safetensors"))
        write_run_config(final_dir, cfg, ds)
        (final_dir / "README.md").write_text(model_card(cfg, meta, bundle, ds, metrics, steps))
    barrier()
    return final_dir
