"""The ``README.md`` model card of an exported student, built with ``huggingface_hub.ModelCard``.

Metadata: ``base_model`` (the teacher, when it is a hub model), ``datasets`` (the hub datasets of the
corpus), ``license`` and ``language`` (``--license``/``--language``, else the teacher's own card's),
``library_name``, ``pipeline_tag`` and a ``model-index`` with the held-out evaluation. The body: a
usage snippet, provenance (teacher path or hub name with revision and weights hash, the store URL
and corpus fingerprint), the student, the loss, the training and its figures: the held-out
evaluation when the run had one, and the loss components averaged over the last steps, not one
noisy batch. ``kd eval --update-card`` replaces the held-out evaluation of an existing card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from offline_kd.store.storage import is_local, local_path

if TYPE_CHECKING:
    from offline_kd.runtime.settings import TrainConfig
    from offline_kd.store.signal_store import StoreMeta
    from offline_kd.train.student import StudentBundle

FILE_SUFFIXES = {".txt", ".text", ".json", ".jsonl", ".parquet", ".csv", ".gz", ".zst", ".zarr"}
EVAL_BEGIN, EVAL_END = "<!-- held-out evaluation -->", "<!-- end of held-out evaluation -->"
EVAL_METRICS = (
    ("accuracy", "masked accuracy"),
    ("masked_perplexity", "masked perplexity"),
    ("teacher_agreement", "top-1 agreement with the teacher"),
)


@dataclass
class CardInputs:
    """What a card says beyond the run's settings: where the model lives and how it scored."""

    model_ref: str  # hub repository or absolute path, for the usage snippet
    model_name: str  # the model-index name
    steps: int
    train_means: dict  # `MetricsLogger.mean_of_last`
    heldout: dict | None  # `HeldOutEval.run`'s result, with the source under "source"


def hub_dataset(source: str) -> str | None:
    """The hub dataset id of a corpus source, or None for a local file or an object-store URL."""
    if source.startswith("hf://datasets/"):
        return "/".join(source.removeprefix("hf://datasets/").split("/")[:2]).split("@")[0]
    if "://" in source or Path(source).exists() or source.startswith((".", "/", "~")):
        return None
    if Path(source.split(":")[0]).suffix.lower() in FILE_SUFFIXES:  # a file that has moved since
        return None
    return source.split(":")[0].split("@")[0] or None  # [ORG/]NAME[@REVISION][:CONFIG[:SPLIT]]


def _teacher_card(teacher: str | None) -> ModelCardData | None:
    """The metadata of a local teacher's own card (hub cards are not fetched: the run may be offline)."""
    if teacher and (Path(teacher) / "README.md").is_file():
        try:
            return ModelCard.load(Path(teacher) / "README.md").data
        except Exception:  # a malformed card only loses the defaults it would have given
            return None
    return None


def card_data(cfg: TrainConfig, meta: StoreMeta, heldout: dict | None, model_name: str) -> ModelCardData:
    teacher = (meta.teacher or {}).get("name_or_path")
    sources = [
        s if isinstance(s, str) else str(s.get("source", s)) for s in (meta.corpus or {}).get("sources", [])
    ]
    datasets = sorted({d for d in map(hub_dataset, sources) if d})
    inherited = _teacher_card(teacher)
    return ModelCardData(
        # the same test as for a dataset: a hub id, not a local directory or a URL
        base_model=teacher if teacher and hub_dataset(teacher) and not Path(teacher).exists() else None,
        datasets=datasets or None,
        license=cfg.card.license or (inherited.license if inherited else None),
        language=cfg.card.language or (inherited.language if inherited else None),
        library_name="transformers",
        pipeline_tag="fill-mask",
        tags=["distillation", "offline-kd"],
        model_name=model_name,
        eval_results=eval_results(heldout) or None,
    )


def eval_results(heldout: dict | None) -> list[EvalResult]:
    if not heldout:
        return []
    source = heldout.get("source", "held-out")
    return [
        EvalResult(
            task_type="fill-mask",
            dataset_type=hub_dataset(source) or "text",
            dataset_name=source,
            metric_type=key,
            metric_name=name,
            metric_value=round(float(heldout[key]), 6),
        )  # fmt: skip
        for key, name in EVAL_METRICS
        if heldout.get(key) is not None
    ]


def eval_section(heldout: dict | None) -> str:
    """The body's held-out evaluation, between markers that ``kd eval --update-card`` replaces."""
    if not heldout:
        text = "No held-out evaluation yet: `kd eval --model DIR --corpus HELDOUT --update-card` adds one."
    else:
        rows = [
            f"| {name} | {heldout[key]:.4f} |" for key, name in EVAL_METRICS if heldout.get(key) is not None
        ]
        text = "\n".join(
            [
                f"On `{heldout.get('source')}` ({heldout.get('sequences')} sequences, "
                f"{heldout.get('masked_tokens')} masked tokens, 15% masking with a fixed seed):",
                "",
                "| metric | value |",
                "|---|---|",
                *rows,
            ]
        )
    return f"{EVAL_BEGIN}\n{text}\n{EVAL_END}"


def usage(model_ref: str, mask_token: str) -> str:
    return "\n".join(
        [
            "```python",
            "from transformers import pipeline",
            "",
            f'fill = pipeline("fill-mask", model="{model_ref}")',
            f'print(fill("The capital of France is {mask_token}."))',
            "```",
        ]
    )


def build_card(
    cfg: TrainConfig, meta: StoreMeta, bundle: StudentBundle, ds: dict, inputs: CardInputs
) -> ModelCard:
    teacher = meta.teacher or {}
    data = card_data(cfg, meta, inputs.heldout, inputs.model_name)
    body = "\n".join(
        [
            f"# Student distilled offline from `{teacher.get('name_or_path')}`",
            "",
            f"Trained with `offline_kd` from a precomputed teacher signal store ({_signal(cfg)}), with the "
            "DistilBERT triple loss.",
            "",
            "## Usage",
            "",
            usage(inputs.model_ref, bundle.tokenizer.mask_token or "[MASK]"),
            "",
            "## Held-out evaluation",
            "",
            eval_section(inputs.heldout),
            "",
            "## Training loss",
            "",
            _train_means(inputs.train_means),
            "",
            *_provenance(cfg, meta, bundle, ds, inputs.steps),
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _signal(cfg: TrainConfig) -> str:
    if cfg.loss.kl_source == "exact":
        return (
            "the teacher's encoder never ran; its MLM head recomputed the full distribution from the "
            "stored hidden states"
        )
    return "the teacher never ran during training"


def _train_means(means: dict) -> str:
    if not means:
        return "No optimizer step was logged."
    cells = "".join(f"| {means[k]:.4f} " for k in ("loss", "kl", "mlm", "cos"))
    return "\n".join(
        [
            f"Mean over the last {means['steps']} optimizer steps (to step {means['last_step']}):",
            "",
            "| loss | kl | mlm | cos |",
            "|---|---|---|---|",
            cells + "|",
        ]
    )


def _provenance(cfg: TrainConfig, meta: StoreMeta, bundle: StudentBundle, ds: dict, steps: int) -> list[str]:
    teacher, loss = meta.teacher or {}, cfg.loss
    if loss.kl_source == "exact":
        kl = f"KL(T={loss.temperature}, exact: full vocabulary through the teacher's MLM head)"
    else:
        kl = f"KL(T={loss.temperature}, top-{meta.top_k}, tail-aware={loss.kl_tail})"
    corpus = meta.corpus or {}
    return [
        "## Teacher",
        "",
        f"- name or path: `{teacher.get('name_or_path')}`, revision `{teacher.get('revision') or 'n/a'}`",
        f"- weights sha256: `{teacher.get('weights_sha256')}`",
        f"- model type: `{teacher.get('model_type')}`, hidden size {meta.hidden_size}",
        "",
        "## Signal store",
        "",
        f"- url: `{_absolute(cfg.store)}`",
        f"- corpus sources: {json.dumps(corpus.get('sources'))}",
        f"- sequences: {meta.num_sequences} × max length {meta.max_length}, views {meta.views}, "
        f"top-k {meta.top_k}, temperatures {meta.temperatures}",
        f"- corpus fingerprint: `{corpus.get('fingerprint')}`",
        f"- tokenizer sha256: `{meta.tokenizer_sha256}`",
        f"- offline_kd version that wrote it: {meta.package_version or 'n/a'}",
        "",
        "## Student",
        "",
        f"- spec: `{cfg.student}` ({bundle.kind}), class `{type(bundle.model).__name__}`, "
        f"hidden {bundle.hidden_size}",
        f"- initialised from teacher layers: {bundle.init_layers}" if bundle.init_layers else "- random init",
        "",
        "## Loss",
        "",
        f"`{loss.alpha_kl}·{kl} + {loss.alpha_mlm}·MLM + {loss.alpha_cos}·cosine`, KL/cosine over "
        f"{'masked' if loss.restrict_kl_to_mask else 'all non-pad'} tokens.",
        "",
        "## Training",
        "",
        f"- optimizer steps: {steps}; global batch {ds['train_batch_size']} "
        f"(micro {ds['train_micro_batch_size_per_gpu']} × accumulation {ds['gradient_accumulation_steps']} "
        "× ranks)",
        f"- ZeRO stage {(ds.get('zero_optimization') or {}).get('stage', 0)}; exact settings in "
        "`train_config.json` and `ds_config.json`",
    ]


def _absolute(url: str) -> str:
    return str(local_path(url).expanduser().resolve()) if is_local(url) else url


def update_eval(model_dir: str | Path, heldout: dict) -> Path:
    """Record a held-out evaluation in ``MODEL/README.md`` (``kd eval --update-card``): the
    ``model-index`` results and the body's held-out section; a model without a card gets one."""
    path, card = _card_of(model_dir)
    kept = [r for r in card.data.eval_results or [] if r.task_type != "fill-mask"]  # downstream results
    card.data.eval_results = eval_results(heldout) + kept or None
    text = _with_section(card.text, "Held-out evaluation", eval_section(heldout), EVAL_BEGIN, EVAL_END)
    ModelCard(f"---\n{card.data.to_yaml()}\n---\n{text}").save(path)
    return path


def _card_of(model_dir: str | Path) -> tuple[Path, ModelCard]:
    """``MODEL/README.md`` and its card (a fresh transformers card when there is none), named."""
    path = Path(model_dir) / "README.md"
    if path.is_file():
        card = ModelCard.load(path)
    else:
        card = ModelCard(f"---\n{ModelCardData(library_name='transformers').to_yaml()}\n---\n\n")
    card.data.model_name = card.data.model_name or Path(model_dir).resolve().name
    return path, card


def _with_section(text: str, title: str, section: str, begin: str, end: str) -> str:
    """`text` with the `section` (wrapped in its `begin` / `end` markers) replacing the one between those
    markers, or appended under ``## title``."""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + section + rest.split(end, 1)[1]
    return text.rstrip("\n") + f"\n\n## {title}\n\n" + section + "\n"


DOWNSTREAM_BEGIN, DOWNSTREAM_END = "<!-- downstream evaluation -->", "<!-- end of downstream evaluation -->"


def downstream_results(rows: list[dict]) -> list[EvalResult]:
    """``model-index`` entries of `kd finetune` results: one per task and metric (median over seeds)."""
    return [
        EvalResult(
            task_type="text-classification",
            dataset_type=row["source"],
            dataset_name=row["task"],
            dataset_config=row["task"].split(":", 1)[1] if row["task"].startswith("glue:") else None,
            dataset_split="validation",
            metric_type=key,
            metric_value=round(float(value), 6),
        )  # fmt: skip
        for row in rows
        for key, value in row["metrics"].items()
    ]


def downstream_section(rows: list[dict]) -> str:
    """The body's downstream results (``kd finetune --update-card``), between markers a rerun replaces."""
    teacher = next((r["teacher"] for r in rows if r.get("teacher")), None)
    lines = [
        "Fine-tuned with `kd finetune`; median over seeds, metrics × 100"
        + (f"; retention: this model's score over the teacher's (`{teacher}`)." if teacher else "."),
        "",
        "| task | metrics | score | seeds | retention |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        values = ", ".join(f"{k} {100 * v:.1f}" for k, v in r["metrics"].items())
        retention = "–" if r.get("retention") is None else f"{100 * r['retention']:.1f}%"
        lines.append(f"| {r['task']} | {values} | {100 * r['score']:.1f} | {r['seeds']} | {retention} |")
    return f"{DOWNSTREAM_BEGIN}\n" + "\n".join(lines) + f"\n{DOWNSTREAM_END}"


def update_downstream(model_dir: str | Path, rows: list[dict]) -> Path:
    """Record downstream results in ``MODEL/README.md``: ``model-index`` entries replacing the card's
    earlier downstream ones for the same tasks, and the body's downstream section."""
    path, card = _card_of(model_dir)
    tasks = {r["task"] for r in rows}
    kept = [
        r for r in card.data.eval_results or [] if r.task_type == "fill-mask" or r.dataset_name not in tasks
    ]
    card.data.eval_results = kept + downstream_results(rows) or None
    section = downstream_section(rows)
    text = _with_section(card.text, "Downstream evaluation", section, DOWNSTREAM_BEGIN, DOWNSTREAM_END)
    ModelCard(f"---\n{card.data.to_yaml()}\n---\n{text}").save(path)
    return path
