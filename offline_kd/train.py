"""Train a student from a signal store with DeepSpeed (the teacher never runs).

``train(TrainConfig)`` runs top to bottom on every rank:

1. distributed set-up (a single-process group on a free port when no launcher set one up);
2. open the store (refused unless every shard is committed), build the student and refuse it
   before step 0 if its vocabulary, tokenizer or (with the cosine loss) width does not fit;
3. resolve the user's DeepSpeed config (micro batch, accumulation, ``auto`` values of the
   scheduler) and ``deepspeed.initialize``;
4. optionally resume from the newest *complete* checkpoint;
5. loop over epochs (view ``epoch mod views``) and micro-batches; every micro-batch's loss
   components are summed over ranks, which also stops every rank together on a non-finite loss;
6. export ``DIR/final`` (gathered under ZeRO-3): ``save_pretrained`` student + tokenizer, model
   card, ``train_config.json`` and the resolved DeepSpeed config.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from offline_kd import checkpoint as ckpt
from offline_kd.data import ReaderConfig, StoreReader, open_store
from offline_kd.distributed import accelerator_device, barrier, init_distributed
from offline_kd.loss import LossConfig, distillation_loss
from offline_kd.metrics import MetricsLogger
from offline_kd.student import StudentBundle, build_student, check_compatible

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss component became NaN or infinite; the run stops without saving."""


@dataclass
class TrainConfig:
    store: str
    student: str
    output: str
    deepspeed_config: str | dict | None = None
    teacher: str | None = None
    init_layers: str | None = None
    init_from_teacher: bool = False
    hidden_projection: bool = False
    # loss
    alpha_ce: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    temperature: float = 2.0
    kl_tail: bool = True
    restrict_kl_to_mask: bool = False
    # schedule
    epochs: int = 3
    max_steps: int | None = None  # stop after this many optimizer steps (does not change the LR schedule)
    schedule_steps: int | None = None  # LR schedule length when the DeepSpeed config says "auto"
    micro_batch_size: int | None = None  # overrides train_micro_batch_size_per_gpu
    gradient_accumulation_steps: int | None = None
    lr: float | None = None  # overrides the optimizer's lr
    warmup_fraction: float = 0.05  # for "auto" warm-up steps
    seed: int = 0
    # data
    num_workers: int = 0
    buffer_chunks: int = 4
    storage_options: dict | None = None
    # checkpoints / logs
    save_every: int = 0
    keep_checkpoints: int | None = None
    resume: bool = False
    progress: bool = True
    tensorboard: bool = True
    debug_param_hash: bool = False
    local_rank: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    output: str
    final_dir: str | None
    steps: int
    metrics: dict = field(default_factory=dict)
    resumed_from: str | None = None


# --------------------------------------------------------------------------------------- config


def load_ds_config(value: str | dict | None) -> dict:
    if value is None:
        default = Path(__file__).resolve().parent.parent / "configs" / "ds_cpu_tiny.json"
        value = str(default)
    if isinstance(value, dict):
        return copy.deepcopy(value)
    return json.loads(Path(value).read_text())


def _is_auto(v: Any) -> bool:
    return v is None or v == "auto"


def resolve_ds_config(ds: dict, cfg: TrainConfig, world_size: int) -> dict:
    """Fill batch sizes and "auto" optimizer/scheduler values; `total_num_steps` must be set later."""
    ds = copy.deepcopy(ds)
    micro = cfg.micro_batch_size or ds.get("train_micro_batch_size_per_gpu")
    gas = cfg.gradient_accumulation_steps or ds.get("gradient_accumulation_steps")
    if _is_auto(micro):
        tb = ds.get("train_batch_size")
        if _is_auto(tb):
            raise ValueError(
                "the DeepSpeed config sets neither train_micro_batch_size_per_gpu nor train_batch_size"
            )
        gas = 1 if _is_auto(gas) else int(gas)
        micro = int(tb) // (gas * world_size)
    gas = 1 if _is_auto(gas) else int(gas)
    micro = int(micro)
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = gas
    ds["train_batch_size"] = micro * gas * world_size
    opt = ds.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        if cfg.lr is not None:
            params["lr"] = cfg.lr
        elif _is_auto(params.get("lr")):
            params["lr"] = 5e-4
    ds.setdefault("steps_per_print", 10**9)
    return ds


def fill_schedule(ds: dict, total_steps: int, warmup_fraction: float) -> dict:
    sched = ds.get("scheduler")
    if sched is None:
        return ds
    params = sched.setdefault("params", {})
    if "total_num_steps" in params or sched.get("type") in ("WarmupDecayLR", "WarmupCosineLR"):
        if _is_auto(params.get("total_num_steps")):
            params["total_num_steps"] = max(int(total_steps), 1)
    if _is_auto(params.get("warmup_num_steps", 0)):
        total = int(params.get("total_num_steps", total_steps))
        params["warmup_num_steps"] = max(1, int(round(warmup_fraction * total)))
    opt_lr = (ds.get("optimizer") or {}).get("params", {}).get("lr")
    if opt_lr is not None and _is_auto(params.get("warmup_max_lr", 0)):
        params["warmup_max_lr"] = opt_lr
    return ds


# --------------------------------------------------------------------------------------- module


class DistillModule(nn.Module):
    """Student (+ optional hidden projection) and the loss, as one module for DeepSpeed."""

    def __init__(self, student: nn.Module, loss_cfg: LossConfig, projection: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.projection = projection
        self.loss_cfg = loss_cfg

    def forward(self, batch: dict[str, torch.Tensor]):
        need_hidden = self.loss_cfg.alpha_cos > 0
        out = self.student(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=need_hidden,
            return_dict=True,
        )
        hidden = out.hidden_states[-1] if need_hidden else None
        return distillation_loss(self.loss_cfg, out.logits, hidden, batch, self.projection)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device, float_dtype: torch.dtype | None):
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        if k == "hidden" and float_dtype is not None:
            v = v.to(float_dtype)
        out[k] = v
    return out


def _params_finite(module: nn.Module, device: torch.device, world: int) -> bool:
    """True when every parameter (this rank's ZeRO-3 partition) is finite on every rank."""
    local = [getattr(p, "ds_tensor", p) for p in module.parameters()]
    local = [t for t in local if t.numel() > 0]
    ok = torch.stack(torch._foreach_norm(local)).isfinite().all() if local else torch.tensor(True)
    flag = ok.to(device=device, dtype=torch.int32).reshape(1)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _param_dtype(ds: dict) -> torch.dtype:
    if (ds.get("bf16") or {}).get("enabled"):
        return torch.bfloat16
    if (ds.get("fp16") or {}).get("enabled"):
        return torch.float16
    return torch.float32


# --------------------------------------------------------------------------------------- export


def gathered_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copy of a module's state dict on every rank (gathers ZeRO-3 partitions)."""
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def params_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def export_student(
    bundle: StudentBundle, state: dict[str, torch.Tensor], out_dir: Path
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """save_pretrained an fp32 copy of the student built from `state` + its tokenizer."""
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
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tok = copy.deepcopy(bundle.tokenizer)
    # DistilBERT-style students take no token_type_ids; keep pipelines from passing them.
    import inspect

    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        tok.model_input_names = [n for n in tok.model_input_names if n != "token_type_ids"]
        tok.init_kwargs["model_input_names"] = tok.model_input_names
    tok.save_pretrained(str(out_dir))
    proj = {k[len("projection.") :]: v for k, v in state.items() if k.startswith("projection.")}
    return model, proj


def model_card(cfg: TrainConfig, meta, bundle: StudentBundle, ds: dict, metrics: dict, steps: int) -> str:
    teacher = meta.teacher or {}
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: fill-mask",
        "tags: [distillation, offline-kd]",
        "---",
        "",
        f"# Student distilled offline from `{teacher.get('name_or_path')}`",
        "",
        "Trained with `offline_kd` from a precomputed teacher signal store (the teacher never ran during "
        "training), with the DistilBERT triple loss.",
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
        f"`{cfg.alpha_ce}·KL(T={cfg.temperature}, tail-aware={cfg.kl_tail}) + {cfg.alpha_mlm}·MLM + "
        f"{cfg.alpha_cos}·cosine`, KL/cosine over {'masked' if cfg.restrict_kl_to_mask else 'all non-pad'} tokens.",
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
    for k in ("loss", "kl", "mlm", "cos", "lr", "tokens_per_s"):
        if k in metrics:
            lines.append(f"| {k} | {metrics[k]:.6g} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- train


def train(cfg: TrainConfig) -> TrainResult:
    import deepspeed

    rank, world = init_distributed(cfg.local_rank)
    device = accelerator_device()
    out = Path(cfg.output)
    is_main = rank == 0

    # ---- store + student, refused before step 0 when they do not fit
    store = open_store(cfg.store, cfg.storage_options)
    meta = store.meta
    if not store.is_complete():
        missing = [i for i, c in enumerate(store.committed()) if not c]
        raise ValueError(f"store {cfg.store} is incomplete: shards {missing[:20]} are not committed")
    del store
    teacher_path = cfg.teacher or (meta.teacher or {}).get("name_or_path")
    bundle = build_student(
        cfg.student,
        teacher_path=teacher_path,
        vocab_size=int(meta.vocab_size),
        max_positions=max(int(meta.max_length), 512),
        pad_token_id=int(meta.pad_token_id),
        init_layers=cfg.init_layers,
        init_from_teacher=cfg.init_from_teacher,
        seed=cfg.seed,
    )
    need_hidden = cfg.alpha_cos > 0
    check_compatible(
        bundle,
        store_vocab_size=int(meta.vocab_size),
        store_tokenizer_sha256=meta.tokenizer_sha256,
        teacher_hidden_size=int(meta.hidden_size),
        need_hidden=need_hidden,
        hidden_projection=cfg.hidden_projection,
    )
    if cfg.kl_tail and not any(abs(float(t) - cfg.temperature) < 1e-6 for t in meta.temperatures):
        raise ValueError(
            f"--temperature {cfg.temperature} is not one of the store's temperatures {meta.temperatures}; "
            "the tail-aware KL needs the stored log-sum-exp at T (pick a stored T or pass --no-kl-tail)"
        )
    projection = None
    if need_hidden and bundle.hidden_size != int(meta.hidden_size):
        torch.manual_seed(cfg.seed)
        projection = nn.Linear(bundle.hidden_size, int(meta.hidden_size))

    # ---- DeepSpeed config and data
    ds = resolve_ds_config(load_ds_config(cfg.deepspeed_config), cfg, world)
    micro, gas = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    reader = StoreReader(
        ReaderConfig(
            url=cfg.store,
            micro_batch_size=micro,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
            buffer_chunks=cfg.buffer_chunks,
            temperature=cfg.temperature if cfg.kl_tail else None,
            hidden=need_hidden,
            storage_options=cfg.storage_options,
        ),
        world_size=world,
        rank=rank,
    )
    steps_per_epoch = reader.micro_per_epoch // gas
    if steps_per_epoch == 0:
        raise ValueError(
            f"one epoch holds {reader.micro_per_epoch} micro-batches per rank, fewer than the "
            f"{gas} accumulation steps of one optimizer step"
        )
    planned = cfg.epochs * steps_per_epoch
    total_steps = min(planned, cfg.max_steps) if cfg.max_steps else planned
    # An "auto" schedule spans --schedule-steps, else --max-steps, else all epochs; pass the same
    # value when resuming (a resumed run with another schedule length is warned about below).
    ds = fill_schedule(ds, cfg.schedule_steps or total_steps, cfg.warmup_fraction)
    if cfg.epochs > int(meta.views) and is_main:
        log.warning(
            "%d epochs over %d mask views: views repeat from epoch %d", cfg.epochs, meta.views, meta.views
        )

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.as_dict(), indent=2) + "\n")
        (out / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")

    module = DistillModule(bundle.model, LossConfig(**_loss_kwargs(cfg)), projection)
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=[p for p in module.parameters() if p.requires_grad], config=ds
    )
    float_dtype = _param_dtype(ds)

    # ---- resume
    step, epoch, micro_pos = 0, 0, 0
    resumed_from = None
    ckpt_dir = out / "checkpoints"
    if cfg.resume:
        loaded = ckpt.load(engine, ckpt_dir)
        if loaded is not None:
            resumed_from, client = loaded
            step, epoch, micro_pos = int(client["step"]), int(client["epoch"]), int(client["micro_pos"])
            if client.get("scheduler") not in (None, ds.get("scheduler")) and is_main:
                log.warning(
                    "resuming with a different LR schedule than the checkpoint's: %s (was %s); pass the same "
                    "--schedule-steps/--max-steps to continue the original schedule",
                    ds.get("scheduler"),
                    client.get("scheduler"),
                )
            layout = (world, micro, gas)
            saved = tuple(client.get("layout") or layout)
            if saved != layout:
                # Another rank count or batch shape: the rank slices of the epoch order differ, so
                # continue at the same number of consumed sequences (not an exact continuation).
                consumed = micro_pos * saved[0] * saved[1]
                micro_pos = (consumed // (world * micro)) // gas * gas
                if is_main:
                    log.warning(
                        "checkpoint made with (ranks, micro, accumulation) = %s, now %s: continuing epoch %d "
                        "after ~%d sequences; the data order is not an exact continuation",
                        saved,
                        layout,
                        epoch,
                        consumed,
                    )
            if is_main:
                log.info(
                    "resumed from %s at step %d (epoch %d, micro-batch %d)",
                    resumed_from,
                    step,
                    epoch,
                    micro_pos,
                )
        elif is_main:
            log.info("--resume: no complete checkpoint in %s, starting fresh", ckpt_dir)

    logger = MetricsLogger(
        out / "logs",
        enabled=is_main,
        total_steps=total_steps,
        start_step=step,
        progress=cfg.progress,
        tensorboard=cfg.tensorboard,
    )
    last_saved = resumed_from
    sched_state = {"scheduler": ds.get("scheduler"), "layout": [world, micro, gas]}
    last_row: dict = {}
    engine.train()
    try:
        while step < total_steps and epoch < cfg.epochs:
            stop = steps_per_epoch * gas
            it = reader.epoch_batches(epoch, start=micro_pos, stop=stop)
            acc = torch.zeros(6, dtype=torch.float64)
            wait = 0.0
            t_step = time.perf_counter()
            while micro_pos < stop and step < total_steps:
                t0 = time.perf_counter()
                batch = next(it)
                wait += time.perf_counter() - t0
                batch = _to_device(batch, device, float_dtype)
                loss, parts = engine(batch)
                vals = torch.stack([parts["loss"], parts["kl"], parts["mlm"], parts["cos"]]).double().cpu()
                ntok = float(batch["attention_mask"].sum())
                red = torch.cat(
                    [vals, torch.tensor([ntok, float(batch["input_ids"].shape[0])], dtype=torch.float64)]
                )
                if world > 1:
                    red_d = red.to(device)
                    dist.all_reduce(red_d)
                    red = red_d.cpu()
                if not torch.isfinite(red[:4]).all():
                    names = ("loss", "kl", "mlm", "cos")
                    detail = ", ".join(f"{n}={float(red[i]) / world:.6g}" for i, n in enumerate(names))
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step + 1} (epoch {epoch}, micro-batch {micro_pos}): {detail}; "
                        f"stopping without saving; last good checkpoint: {last_saved or 'none'}"
                    )
                engine.backward(loss)
                engine.step()
                acc += red
                micro_pos += 1
                if micro_pos % gas:
                    continue
                step += 1
                if not _params_finite(engine.module, device, world):
                    raise NonFiniteLossError(
                        f"non-finite parameters after the update of step {step} (epoch {epoch}): the gradients "
                        f"were not finite although the loss was; stopping without saving; last good "
                        f"checkpoint: {last_saved or 'none'}"
                    )
                dt = time.perf_counter() - t_step
                t_step = time.perf_counter()
                n_parts = gas * world
                last_row = {
                    "step": step,
                    "epoch": epoch,
                    "samples": int(acc[5]),
                    "tokens": int(acc[4]),
                    "loss": float(acc[0] / n_parts),
                    "kl": float(acc[1] / n_parts),
                    "mlm": float(acc[2] / n_parts),
                    "cos": float(acc[3] / n_parts),
                    "lr": float(engine.get_lr()[0]) if engine.get_lr() else float("nan"),
                    "tokens_per_s": float(acc[4]) / max(dt, 1e-9),
                    "step_time_s": dt,
                    "reader_wait_s": wait,
                }
                logger.log(last_row)
                acc.zero_()
                wait = 0.0
                if cfg.save_every and step % cfg.save_every == 0:
                    client = {
                        "step": step,
                        "epoch": epoch,
                        "micro_pos": micro_pos,
                        "metrics": last_row,
                        **sched_state,
                    }
                    if micro_pos >= stop:  # the epoch is done: resume at the next one
                        client.update(epoch=epoch + 1, micro_pos=0)
                    last_saved = ckpt.save(engine, ckpt_dir, step, client, cfg.keep_checkpoints)
            if micro_pos >= stop:
                epoch += 1
                micro_pos = 0
        if cfg.save_every and last_saved != ckpt.tag_for(step) and step > 0:
            client = {
                "step": step,
                "epoch": epoch,
                "micro_pos": micro_pos,
                "metrics": last_row,
                **sched_state,
            }
            last_saved = ckpt.save(engine, ckpt_dir, step, client, cfg.keep_checkpoints)
    finally:
        logger.close()

    # ---- export
    state = gathered_state_dict(engine.module)
    if cfg.debug_param_hash:
        dbg = out / "debug"
        dbg.mkdir(parents=True, exist_ok=True)
        (dbg / f"params_rank{rank}.sha256").write_text(params_sha256(state) + "\n")
    final_dir = out / "final"
    if is_main:
        _, proj = export_student(bundle, state, final_dir)
        if proj:
            from safetensors.torch import save_file

            save_file(proj, str(out / "projection.safetensors"))
        (final_dir / "train_config.json").write_text(json.dumps(cfg.as_dict(), indent=2) + "\n")
        (final_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")
        (final_dir / "README.md").write_text(model_card(cfg, meta, bundle, ds, last_row, step))
    barrier()
    return TrainResult(str(out), str(final_dir), step, last_row, resumed_from)


def _loss_kwargs(cfg: TrainConfig) -> dict:
    """The loss settings of the training config (TrainConfig carries every LossConfig field)."""
    return {f.name: getattr(cfg, f.name) for f in fields(LossConfig)}
