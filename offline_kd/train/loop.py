"""Train a student from a signal store with DeepSpeed (the teacher never runs).

``train(TrainConfig)`` reads top to bottom and runs the same on every rank: check every input
(`offline_kd.train.checks`); join the process group; build the student and refuse one that does not
fit the store (`prepare_run`); resolve the DeepSpeed config and the reader (`plan_run`); build the
engine; resume from the newest *complete* checkpoint (`Checkpointer`); loop over epochs (view ``epoch
mod views``), optimizer steps and each step's micro-batches (`optimizer_step`); export ``DIR/final``
(`offline_kd.train.export`). The checkpointer and the held-out evaluator decide themselves which
steps they act on. Every micro-batch's loss components are summed over ranks, which also stops every
rank together on a non-finite loss.
"""

from __future__ import annotations

import logging
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from offline_kd.runtime.distributed import accelerator_device, init_distributed, rank, start_heartbeat
from offline_kd.runtime.errors import UsageError
from offline_kd.runtime.launcher import launcher_env
from offline_kd.runtime.progress import quiet_library_bars
from offline_kd.runtime.settings import TrainConfig
from offline_kd.store.lease import StoreLease
from offline_kd.store.signal_store import SignalStore, StoreMeta
from offline_kd.teacher.reduced_head import HEAD_DTYPES, ReducedPrecisionHead
from offline_kd.train.checkpoint import Checkpointer
from offline_kd.train.checks import RUN_FILES, TrainInputs, check_train, kl_source_note
from offline_kd.train.ds_config import fill_schedule, load_ds_config, resolve_ds_config
from offline_kd.train.export import export_run, redacted_settings, write_run_config
from offline_kd.train.heldout import HeldOutEvaluator
from offline_kd.train.ledger import StepLedger
from offline_kd.train.loss import COMPONENTS, FusedHead, LossConfig, distillation_loss, loss_rows
from offline_kd.train.metrics import MetricsLogger
from offline_kd.train.output_layer import features_instead_of_logits, fusable, output_layer
from offline_kd.train.preemption import Preempted, StopAndSaveRequests, hung_rank_error
from offline_kd.train.reader import ReaderConfig, StoreReader
from offline_kd.train.state import Layout, TrainState
from offline_kd.train.student import StudentBundle, build_student, check_compatible

log = logging.getLogger(__name__)

# The model card's training figures: the loss components averaged over the last steps.
CARD_MEAN_STEPS = 50
# Steps between reads of the loss sums on the host when --log-every is 0 (progress by time only).
FLUSH_EVERY = 50


@dataclass
class TrainResult:
    output: str
    final_dir: str | None
    steps: int
    metrics: dict = field(default_factory=dict)
    resumed_from: str | None = None


@dataclass
class PreparedRun:
    """What the store and the student are, once both are known to fit together."""

    meta: StoreMeta
    bundle: StudentBundle
    projection: nn.Module | None  # student → teacher width for the cosine loss, when they differ
    teacher_head: ReducedPrecisionHead | None = None  # kl_source exact: the teacher's MLM head, on the device
    fused: bool = False  # the student's output layer applied inside the loss


@dataclass
class EpochPlan:
    """How many micro-batches and optimizer steps the run takes."""

    micro_batches: int  # per rank per epoch: the whole optimizer steps of the rank's slice
    steps_per_epoch: int
    total_steps: int  # all epochs, or --max-steps when smaller


# --------------------------------------------------------------------------------------- module


class DistillModule(nn.Module):
    """Student (+ optional hidden projection) and the loss, as one module for DeepSpeed.

    The teacher's head (exact KL) is a constant of the loss, held outside the module tree: DeepSpeed
    neither optimises, casts, partitions (ZeRO-3) nor checkpoints it, and the export never sees it.
    """

    def __init__(
        self,
        student: nn.Module,
        loss_cfg: LossConfig,
        projection: nn.Module | None = None,
        vocab_size: int | None = None,
        grad_accumulation: int = 1,
        teacher_head=None,
        fused: bool = False,
    ):
        super().__init__()
        self.student = student
        self.projection = projection
        self.loss_cfg = loss_cfg
        self.vocab_size = vocab_size  # the student's logits may be wider (padded vocabulary)
        self.grad_accumulation = grad_accumulation  # engine.backward divides the loss by it
        object.__setattr__(self, "teacher_head", teacher_head)  # a constant, not a submodule
        # the student's own layer, not registered a second time (the checkpoints hold the student alone)
        object.__setattr__(self, "output_layer", output_layer(student) if fused else None)
        if self.output_layer is not None:
            # The loss reads the output layer's weight after the layer's own forward: under ZeRO-3 it must
            # stay gathered for this module's whole forward (a no-op for the other stages).
            from deepspeed.runtime.zero import register_external_parameter

            for p in (self.output_layer.weight, self.output_layer.bias):
                if p is not None:
                    register_external_parameter(self, p)

    def forward(self, batch: dict[str, torch.Tensor]):
        need_hidden = self.loss_cfg.alpha_cos > 0
        fused = None
        with self._student_outputs() as layer:
            out = self.student(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=need_hidden,
                return_dict=True,
            )
        if layer is not None:  # out.logits are the output layer's features: the loss applies the layer
            fused = FusedHead(layer.weight, layer.bias, self.loss_cfg.head_chunk_rows or None)
        hidden = out.hidden_states[-1] if need_hidden else None
        # nothing reads the logits after the loss: their gradient is written over them, already scaled
        # by the 1 / accumulation steps that engine.backward applies
        return distillation_loss(
            self.loss_cfg, out.logits, hidden, batch, self.projection, self.vocab_size, consume_logits=True,
            expected_upstream=1.0 / self.grad_accumulation, teacher_head=self.teacher_head, fused=fused,
        )  # fmt: skip

    @contextmanager
    def _student_outputs(self):
        """Yields the output layer the loss applies (fused), or None (the model applies it)."""
        if self.output_layer is None:
            yield None
            return
        with features_instead_of_logits(self.output_layer) as layer:
            yield layer


# --------------------------------------------------------------------------------------- set-up


def prepare_run(cfg: TrainConfig, found: TrainInputs) -> PreparedRun:
    """Build the student (and, for the exact KL, take the teacher's head); refuse a student that does
    not fit the store before step 0."""
    meta = found.store.meta
    exact = found.kl_source == "exact"
    teacher_head = None
    if exact:
        device, dtype = accelerator_device(), cfg.loss.teacher_head_dtype
        teacher_head = exact_teacher_head(found.store, found.teacher, device, dtype)
    bundle = build_student(
        cfg.student,
        teacher_path=found.teacher or (meta.teacher or {}).get("name_or_path"),
        vocab_size=int(meta.vocab_size),
        max_positions=max(int(meta.max_length), 512),
        pad_token_id=int(meta.pad_token_id),
        init_layers=cfg.init_layers,
        init_from_teacher=cfg.init_from_teacher,
        seed=cfg.seed,
        hub_kernels=cfg.hub_kernels,
    )
    need_hidden = cfg.loss.alpha_cos > 0
    check_compatible(
        bundle,
        store_vocab_size=int(meta.vocab_size),
        store_tokenizer_sha256=meta.tokenizer_sha256,
        teacher_hidden_size=int(meta.hidden_size),
        need_hidden=need_hidden,
        hidden_projection=cfg.hidden_projection,
    )
    # The student's tokenizer records the store's sequence length: `kd eval` defaults to it.
    bundle.tokenizer.model_max_length = int(meta.max_length)
    projection = None
    if need_hidden and bundle.hidden_size != int(meta.hidden_size):
        torch.manual_seed(cfg.seed)
        projection = nn.Linear(bundle.hidden_size, int(meta.hidden_size))
    return PreparedRun(meta, bundle, projection, teacher_head, fused_or_not(cfg, bundle, rank() == 0))


def exact_teacher_head(
    store: SignalStore,
    teacher: str | None = None,
    device: torch.device | str = "cpu",
    dtype: str = "float16",
) -> ReducedPrecisionHead:
    """The teacher's MLM head for the exact KL on `device`, its matmuls' inputs in `dtype` (fp32
    accumulation), checked against the store's hidden size and vocabulary: the stored one, else (a store
    written without one) the head of `teacher` (``--teacher``, default: the teacher the store records)
    once its weights hash matches the store's."""
    from offline_kd.teacher.model import resolve_head

    teacher = teacher or (store.meta.teacher or {}).get("name_or_path")
    head = resolve_head(store, teacher, device="cpu", dtype=torch.float32)
    return ReducedPrecisionHead(head, HEAD_DTYPES[dtype], device=device)


def fused_or_not(cfg: TrainConfig, bundle: StudentBundle, is_main: bool) -> bool:
    """Whether the loss applies the student's output layer (fused): asked for, and the model allows it."""
    if not cfg.loss.fused_head:
        return False
    why = fusable(bundle.model, bundle.true_vocab_size)
    if why is not None and is_main:
        log.warning("the student's output layer cannot be fused into the loss (%s): unfused", why)
    return why is None


def plan_run(
    cfg: TrainConfig, store: SignalStore, rank: int, world: int
) -> tuple[dict, StoreReader, EpochPlan]:
    """The resolved DeepSpeed config, this rank's reader and the run's length in steps."""
    ds = resolve_ds_config(
        load_ds_config(cfg.deepspeed_config),
        world,
        micro_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr=cfg.lr,
    )
    gas = ds["gradient_accumulation_steps"]
    topk = cfg.loss.kl_source == "topk"  # the exact KL reads the hidden states instead of the top-k
    reader = StoreReader(
        ReaderConfig(
            url=cfg.store,
            micro_batch_size=ds["train_micro_batch_size_per_gpu"],
            seed=cfg.seed,
            num_workers=cfg.data.num_workers,
            buffer_chunks=cfg.data.buffer_chunks,
            temperature=cfg.loss.temperature if topk and cfg.loss.kl_tail else None,
            hidden=cfg.loss.alpha_cos > 0 or not topk,
            topk=topk,
            storage_options=cfg.storage_options,
        ),
        world_size=world,
        rank=rank,
        store=store,
    )
    steps_per_epoch = reader.micro_per_epoch // gas
    if steps_per_epoch == 0:
        raise UsageError(
            f"--store {cfg.store} is too small for this batch shape: one epoch holds "
            f"{reader.micro_per_epoch} micro-batches per rank, fewer than the {gas} accumulation steps of "
            "one optimizer step (lower --micro-batch-size or --gradient-accumulation-steps)"
        )
    planned = cfg.epochs * steps_per_epoch
    total_steps = min(planned, cfg.max_steps) if cfg.max_steps else planned
    # An "auto" schedule spans --schedule-steps, else --max-steps, else all epochs; pass the same
    # value when resuming (a resumed run with another schedule length is warned about).
    ds = fill_schedule(ds, cfg.schedule_steps or total_steps, cfg.warmup_fraction)
    if cfg.epochs > int(store.meta.views) and rank == 0:
        log.warning(
            "%d epochs over %d mask views: views repeat from epoch %d",
            cfg.epochs, store.meta.views, store.meta.views,
        )  # fmt: skip
    return ds, reader, EpochPlan(steps_per_epoch * gas, steps_per_epoch, total_steps)


def build_engine(cfg: TrainConfig, run: PreparedRun, ds: dict):
    """The DeepSpeed engine over the student, its projection and the loss."""
    import deepspeed

    gas = int(ds["gradient_accumulation_steps"])
    module = DistillModule(
        run.bundle.model,
        cfg.loss,
        run.projection,
        run.bundle.true_vocab_size,
        gas,
        run.teacher_head,
        run.fused,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=[p for p in module.parameters() if p.requires_grad], config=ds
    )
    return engine


# --------------------------------------------------------------------------------------- loop pieces


def sum_over_ranks(
    parts: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], world: int
) -> torch.Tensor:
    """float64 [loss components..., tokens, sequences] of one micro-batch, summed over ranks, on the device
    (nothing is read on the host here: `StepLedger.flush` does, once per flush)."""
    values = torch.stack([parts[name] for name in COMPONENTS]).double()
    mask = batch["attention_mask"]
    counts = torch.stack([mask.sum(), mask.new_full((), batch["input_ids"].shape[0])])  # no host copy
    sums = torch.cat([values, counts.to(values.device, torch.float64)])
    if world > 1:
        dist.all_reduce(sums)
    return sums


def params_finite(module: nn.Module, device: torch.device, world: int) -> torch.Tensor:
    """int32 [1] on the device: 1 when every parameter (this rank's ZeRO-3 partition) is finite on every
    rank, read at the next flush."""
    local = [getattr(p, "ds_tensor", p) for p in module.parameters()]
    local = [t for t in local if t.numel() > 0]
    ok = torch.stack(torch._foreach_norm(local)).isfinite().all() if local else torch.tensor(True)
    flag = ok.to(device=device, dtype=torch.int32).reshape(1)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag


def grad_norm_before_step(engine) -> torch.Tensor | None:
    """The gradient norm where DeepSpeed records none (fp32 without ZeRO clips without keeping it);
    at the accumulation boundary the gradients are already reduced over ranks. Left on the device."""
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.stack(torch._foreach_norm(grads)).norm() if grads else None


def grad_norm_after_step(engine, before: torch.Tensor | None) -> torch.Tensor | float | None:
    """DeepSpeed's norm of the step's gradients, else the one taken before the step; read at the flush."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return before
    return norm.detach().clone() if torch.is_tensor(norm) else norm


def _lr(engine) -> float:
    lrs = engine.get_lr()
    return float(lrs[0]) if lrs else float("nan")


# --------------------------------------------------------------------------------------- train


def forward_backward(
    engine, batch: dict[str, torch.Tensor], world: int, boundary: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-batch: forward, backward and DeepSpeed's step, which updates only at the accumulation
    boundary. Returns the loss parts summed over ranks and, at the boundary, the gradient norm before the
    step, both left on the device."""
    loss, parts = engine(batch)
    sums = sum_over_ranks(parts, batch, world)
    engine.backward(loss)
    norm = grad_norm_before_step(engine) if boundary else None
    engine.step()
    return sums, norm


def optimizer_step(engine, batches, gas: int, world: int, state: TrainState, ledger: StepLedger) -> None:
    """One optimizer step: its micro-batches' forward and backward, DeepSpeed stepping at the boundary,
    then the check that the update left finite parameters. What they compute stays on the device, in
    `ledger`, until the loop flushes it: the host never waits for the accelerator here."""
    norm, wait, t_step = None, 0.0, time.perf_counter()
    while True:
        t0 = time.perf_counter()
        batch = next(batches)  # already on the device (`DevicePrefetch`)
        wait += time.perf_counter() - t0
        boundary = (state.micro_pos + 1) % gas == 0
        sums, norm = forward_backward(engine, batch, world, boundary)
        ledger.add_micro_batch(sums, state.micro_pos)
        state.micro_pos += 1
        if boundary:  # a resume always starts on a step boundary
            break
    state.step += 1
    ledger.end_step(
        state.step, state.epoch, params_finite(engine.module, accelerator_device(), world), lr=_lr(engine),
        step_time_s=time.perf_counter() - t_step, reader_wait_s=wait, grad_norm=grad_norm_after_step(engine, norm),
        global_samples=int(engine.global_samples),
    )  # fmt: skip


def flush_steps(ledger: StepLedger, logger: MetricsLogger, last_saved: str | None, row: dict) -> dict:
    """The recorded steps read back to the host (one sync), checked and logged; returns the newest row."""
    for row in ledger.flush(last_saved):  # noqa: B020 - the newest row is the one returned
        logger.log(row, monitor_x=row.pop("global_samples"))  # the samples seen when the step ended
    return row


@dataclass
class AfterStep:
    """What acts on a finished step, each part deciding itself whether the step is its: the stop and
    timed-save requests, the ledger's flush into the logs, the held-out evaluator and the checkpointer."""

    ledger: StepLedger
    logger: MetricsLogger
    heldout: HeldOutEvaluator
    checkpointer: Checkpointer
    requests: StopAndSaveRequests
    flush_every: int
    vocab: int | None
    row: dict = field(default_factory=dict)  # the newest step's metrics, once read back

    def __call__(self, engine, state: TrainState, micro_batches: int, is_main: bool) -> None:
        signum, timed_save = self.requests.agree(state.step, is_main)
        due = self.checkpointer.due(state.step) or self.heldout.due(state.step)
        # A checkpoint or an evaluation only ever follows steps read back and found finite.
        if signum or timed_save or due or state.step % self.flush_every == 0:
            self.row = flush_steps(self.ledger, self.logger, self.checkpointer.last_saved, self.row)
        self.heldout.evaluate(engine, state.step, self.logger, self.vocab)
        if self.checkpointer.save(state, micro_batches, self.row, force=bool(signum) or timed_save):
            self.requests.saved()
        if signum:
            raise Preempted(
                f"stopped by {signal.Signals(signum).name} after step {state.step}; checkpoint "
                f"{self.checkpointer.last_saved} saved: rerun the same command with --resume to continue",
                signum,
            )

    def finish(self, engine, state: TrainState, micro_batches: int) -> None:
        """The last step is always read back, resumable and scored, whatever the cadences."""
        self.row = flush_steps(self.ledger, self.logger, self.checkpointer.last_saved, self.row)
        self.checkpointer.save(state, micro_batches, self.row, last_step=True)
        self.heldout.evaluate(engine, state.step, self.logger, self.vocab, last_step=True)


class DevicePrefetch:
    """Micro-batches copied to the device one ahead: the copy of the next (from pinned memory, without
    blocking the host) overlaps the current one's compute."""

    def __init__(self, batches, device: torch.device, loss_cfg: LossConfig | None = None):
        self.batches, self.device, self.loss_cfg = iter(batches), device, loss_cfg
        self.next = self._fetch()

    def _fetch(self):
        batch = next(self.batches, None)
        if batch is not None and self.loss_cfg is not None:  # the fused loss's rows, found on the host
            rows = loss_rows(self.loss_cfg, batch)
            batch["loss_rows"] = rows.pin_memory() if self.device.type == "cuda" else rows
        # Stored hidden states stay as stored (fp16, or bf16): the cosine loss casts them to the student's
        # dtype, the exact KL feeds them to the fp32 teacher head (a bf16 copy of fp16 ones would round them).
        return None if batch is None else {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def __iter__(self):
        return self

    def __next__(self):
        if self.next is None:
            raise StopIteration
        batch, self.next = self.next, self._fetch()
        return batch


@contextmanager
def claim_run_dir(cfg: TrainConfig, is_main: bool):
    """One run writes a run directory at a time: rank 0 holds a lease on it (the store's kind, beside it)
    for the whole run; with --overwrite it then deletes what an earlier run wrote there, and only that."""
    if not is_main:
        yield
        return
    with StoreLease(cfg.output, 0):
        if cfg.overwrite:
            for name in RUN_FILES:
                path = Path(cfg.output) / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        yield


def train(cfg: TrainConfig) -> TrainResult:
    # Every input is checked (the store opened, an "auto" KL source resolved) before the process group.
    found, launched = check_train(cfg, launcher_env().world_size), launcher_env()
    if cfg.loss.kl_source == "auto" and launched.rank == 0:
        log.info("%s", kl_source_note(found.kl_source))
    # The run records what it resolved: the teacher it uses and the KL source 'auto' stood for.
    cfg = replace(cfg, teacher=found.teacher, loss=replace(cfg.loss, kl_source=found.kl_source))
    with claim_run_dir(cfg, launched.rank == 0):
        return run_training(cfg, found)


def run_training(cfg: TrainConfig, found: TrainInputs) -> TrainResult:
    """The run itself, on every rank, once its inputs are checked and its directory is claimed."""
    # Every rank joins one process group (a local one without a launcher).
    rank, world = init_distributed(cfg.local_rank, cfg.collective_timeout)
    start_heartbeat()  # so a rank that stops answering can be named
    out, is_main = Path(cfg.output), rank == 0
    quiet_library_bars(rank)  # no \r frames in log files, no bar from ranks above 0
    # Refuse a student that cannot work with the store before anything expensive runs.
    run = prepare_run(cfg, found)
    # Batch shape, "auto" values and the run's length depend on the rank count and the store.
    ds, reader, plan = plan_run(cfg, found.store, rank, world)
    gas, micro = ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"]
    # The exact settings go on disk before step 0, so even a crashed run says what it was.
    if is_main:
        write_run_config(out, cfg, ds)
    # DeepSpeed owns the optimizer, the ZeRO partitioning and the accumulation boundary.
    engine = build_engine(cfg, run, ds)
    # Continue at the next unseen micro-batch of the newest complete checkpoint.
    checkpointer = Checkpointer(engine, out / "checkpoints", cfg.checkpoint)
    fresh = TrainState(layout=Layout(world, micro, gas), scheduler=ds.get("scheduler"))
    state = checkpointer.resume(fresh, is_main)
    # Rank 0 alone logs; a resumed run drops the rows after its checkpoint's step and redoes them.
    logger = MetricsLogger(out / "logs", cfg.logs, enabled=is_main, total_steps=plan.total_steps,
                           start_step=state.step, monitor=getattr(engine, "monitor", None),
                           monitor_x=lambda: int(engine.global_samples))  # fmt: skip
    logger.log_hparams({"train": redacted_settings(cfg), "deepspeed": ds})
    heldout = HeldOutEvaluator(cfg.heldout, run.bundle.tokenizer, run.meta, batch_size=int(micro), rank=rank,
                               world=world, storage_options=cfg.storage_options)  # fmt: skip
    # Loss sums stay on the device until a flush: every --log-every steps and before a save or an eval.
    after = AfterStep(StepLedger(world), logger, heldout, checkpointer,
                      StopAndSaveRequests(world, cfg.checkpoint.save_every_minutes, cfg.collective_timeout),
                      cfg.logs.log_every or FLUSH_EVERY, run.bundle.true_vocab_size)  # fmt: skip
    engine.train()
    try:
        with after.requests:  # SIGTERM, SIGINT, SIGUSR1: a checkpoint after the current step, then stop
            while state.step < plan.total_steps and state.epoch < cfg.epochs:
                # An epoch's order is a pure function of (seed, epoch): start where this rank stopped.
                batches = reader.epoch_batches(state.epoch, start=state.micro_pos, stop=plan.micro_batches)
                batches = DevicePrefetch(batches, accelerator_device(), cfg.loss)
                while state.micro_pos < plan.micro_batches and state.step < plan.total_steps:
                    optimizer_step(engine, batches, gas, world, state, after.ledger)
                    after(engine, state, plan.micro_batches, is_main)
                if state.micro_pos >= plan.micro_batches:
                    state.next_epoch()
            after.finish(engine, state, plan.micro_batches)
        card_metrics = {"train": logger.mean_of_last(CARD_MEAN_STEPS), "eval": heldout.result}
    except RuntimeError as e:  # a collective that timed out: name the rank that stopped answering
        hung = hung_rank_error(e, state.step, cfg.collective_timeout)
        if hung is None:
            raise
        raise hung from e
    finally:
        logger.close()
    # Gather (ZeRO-3 partitions) and write a save_pretrained student with its card.
    final_dir = export_run(engine.module, cfg, run.meta, run.bundle, ds, card_metrics, state.step, rank)
    return TrainResult(str(out), str(final_dir), state.step, after.row, checkpointer.resumed_from)
