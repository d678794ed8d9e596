"""`finetune(cfg)`: check every input, run the missing cells with one ETA, measure, report."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from offline_kd.downstream import report as rep
from offline_kd.downstream.finetune import (
    Plan,
    cell_path,
    check_inputs,
    fingerprint,
    finished_cell,
    run_cell,
    train_steps,
    write_json,
)
from offline_kd.runtime.launcher import launcher_env
from offline_kd.runtime.settings import FinetuneConfig


def finetune(cfg: FinetuneConfig, log=None) -> dict:
    """Fine-tune every model on every task with every seed (finished cells are read back), then write
    ``report.json``, ``report.md`` and ``report.png`` under ``cfg.output``; returns the report."""
    from offline_kd.runtime.log_noise import drop_expected_deepspeed_warnings
    from offline_kd.runtime.progress import quiet_library_bars

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    rank0 = launcher_env().rank == 0
    quiet_library_bars(launcher_env().rank)  # in a log file: no bars of datasets / transformers
    plan = check_inputs(cfg)  # every UsageError is raised here, before any training
    drop_expected_deepspeed_warnings(cpu_expected=True)
    cells = _run_cells(cfg, plan, log if rank0 else (lambda m: None), rank0)
    if not rank0:
        return {}
    speed = _speed(cfg, plan, log) if cfg.speed else None
    teacher = next((m.name for m in plan.models if m.teacher), None)
    report = rep.aggregate(
        cells, [m.name for m in plan.models], [t.spec.name for t in plan.tasks], teacher, speed
    )
    _write(cfg, plan, report, log)
    return report


def _run_cells(cfg: FinetuneConfig, plan: Plan, log, rank0: bool) -> list[dict]:
    from offline_kd.runtime.progress import Progress

    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    todo, cells = [], []
    for ref in plan.models:
        for task in plan.tasks:
            for seed in seeds:
                path, fp = cell_path(cfg, ref, task, seed), fingerprint(cfg, ref, task, seed)
                done = finished_cell(path, fp)
                (cells.append(done) if done else todo.append((ref, task, seed, path, fp)))
    total = sum(train_steps(t, cfg, launcher_env().world_size) for _, t, *_ in todo)
    log(f"finetune: {len(cells)} cell(s) done, {len(todo)} to run ({total} training steps) -> {cfg.output}")
    progress = Progress(total, desc="finetune", unit="step", enabled=rank0 and cfg.progress and total > 0,
                        every_seconds=30.0)  # fmt: skip
    for ref, task, seed, path, fp in todo:
        t0 = time.time()
        result = run_cell(cfg, ref, plan.tokenizers[ref.name], task, seed, progress)
        result["fingerprint"] = fp
        if rank0:
            write_json(path, result)
        progress.note(f"{ref.name} / {task.spec.name} / seed {seed}: score {100 * result['score']:.1f} "
                      f"({time.time() - t0:.0f}s)")  # fmt: skip
        cells.append(result)
    progress.close()
    return cells


def _speed(cfg: FinetuneConfig, plan: Plan, log) -> dict:
    """Size and speed of every model on the same eval texts (the first task's first eval split)."""
    from offline_kd.downstream import speed

    task = plan.tasks[0]
    ds = next(iter(task.evals.values()))
    n = min(cfg.latency_samples, len(ds))
    texts = [tuple(ds[i][f] for f in task.spec.text_fields) for i in range(n)]
    log(
        f"size and speed: {len(plan.models)} model(s), {n} examples of {task.spec.name} at batch 1 on the CPU"
    )
    paths = {m.name: m.path for m in plan.models}
    results = speed.measure(
        paths, plan.tokenizers, texts, cfg.max_length, cfg.throughput_batch, cfg.hub_kernels
    )
    teacher = next((m.name for m in plan.models if m.teacher), None)
    return {
        "inputs": f"{n} examples of {task.spec.name}, batch 1, CPU",
        "models": {k: v.as_dict() for k, v in results.items()},
        "ratios": speed.ratios(results, teacher) if teacher else {},
    }


def _write(cfg: FinetuneConfig, plan: Plan, report: dict, log) -> None:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    (out / "report.md").write_text(rep.markdown(report))
    rep.plot(report, out / "report.png")
    log(f"report: {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'}")
    if cfg.update_card:
        from offline_kd.publish.model_card import update_downstream

        sources = {t.spec.name: _dataset_type(t, cfg) for t in plan.tasks}
        for ref in plan.models:  # the students' cards (a teacher's card is its owner's)
            if Path(ref.path).is_dir() and not ref.teacher:
                card = update_downstream(ref.path, rep.card_rows(report, ref.name, sources))
                log(f"model card updated: {card}")


def _dataset_type(task, cfg: FinetuneConfig) -> str:
    """A card's dataset type: the hub dataset of a GLUE task (a mirror's too), a local task's folder name."""
    if task.spec.name.startswith("glue:"):
        return "nyu-mll/glue" if Path(cfg.glue_source).is_dir() else cfg.glue_source
    return Path(task.source).name


def load_report(output: str) -> dict:
    return json.loads((Path(output) / "report.json").read_text())
