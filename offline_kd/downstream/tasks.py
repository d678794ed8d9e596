"""Downstream tasks: what a ``--task`` value names, loading it, and checking it before any training.

A task is GLUE by name (``glue:sst2``, ``glue:all`` for the nine DistilBERT reports), read with
`datasets` from the hub's ``nyu-mll/glue`` repository or from a mirror of it (``--glue-source``: a
hub repository or a local directory laid out like the hub's, ``CONFIG/SPLIT-*.parquet``), or a local
task: a directory of split files (``train.csv``, ``validation.jsonl``, ``dev.tsv``, ``train-*.parquet``,
or a `datasets` ``save_to_disk`` directory) or split files named directly. Every load returns a
`LoadedTask` whose splits hold the text fields and an integer (classification) or float
(regression) ``label`` column.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from offline_kd.runtime.errors import UsageError

if TYPE_CHECKING:
    from datasets import Dataset

CLASSIFICATION, REGRESSION = "classification", "regression"
TASK_TYPES = ("auto", CLASSIFICATION, REGRESSION)
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its fields, the kind of label, its splits and its official metrics."""

    name: str
    text_fields: tuple[str, ...]
    kind: str  # CLASSIFICATION | REGRESSION
    metrics: tuple[str, ...]
    num_labels: int | None = None  # None: from the training labels (local tasks)
    label_field: str = "label"
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("validation",)
    label_names: tuple[str, ...] = ()

    @property
    def head_size(self) -> int:
        return 1 if self.kind == REGRESSION else int(self.num_labels or len(self.label_names))


def _glue(fields, metrics=("accuracy",), kind=CLASSIFICATION, labels=2, evals=("validation",)) -> dict:
    return dict(text_fields=tuple(fields), metrics=metrics, kind=kind, num_labels=labels, eval_splits=evals)


# The nine GLUE tasks of DistilBERT's table, with each one's official metrics.
GLUE: dict[str, dict] = {
    "cola": _glue(("sentence",), ("matthews_correlation",)),
    "mnli": _glue(("premise", "hypothesis"), labels=3, evals=("validation_matched", "validation_mismatched")),
    "mrpc": _glue(("sentence1", "sentence2"), ("f1", "accuracy")),
    "qnli": _glue(("question", "sentence")),
    "qqp": _glue(("question1", "question2"), ("f1", "accuracy")),
    "rte": _glue(("sentence1", "sentence2")),
    "sst2": _glue(("sentence",)),
    "stsb": _glue(("sentence1", "sentence2"), ("pearson", "spearmanr"), kind=REGRESSION, labels=1),
    "wnli": _glue(("sentence1", "sentence2")),
}
GLUE_SOURCE = "nyu-mll/glue"


@dataclass(frozen=True)
class LocalTaskOptions:
    """How to read a local task (``--text-fields``, ``--label-field``, ``--train-split``, ...)."""

    text_fields: tuple[str, ...] = ()
    label_field: str = "label"
    train_split: str = "train"
    eval_split: str = "validation"
    task_type: str = "auto"
    glue_source: str = GLUE_SOURCE


@dataclass
class LoadedTask:
    """A task's spec and its splits: the text fields and ``label`` (int ids, or floats for regression)."""

    spec: TaskSpec
    train: Dataset
    evals: dict[str, Dataset] = field(default_factory=dict)
    source: str = ""


def expand_tasks(values: list[str]) -> list[str]:
    """``--task`` values in order, ``glue:all`` expanded to the nine GLUE tasks; unknown GLUE names refused."""
    out: list[str] = []
    for value in values:
        if value.lower() == "glue:all":
            out += [f"glue:{name}" for name in GLUE]
            continue
        if value.lower().startswith("glue:"):
            name = value.split(":", 1)[1].lower().replace("-", "")
            if name not in GLUE:
                raise UsageError(f"--task {value}: no such GLUE task (one of {', '.join(GLUE)}, or glue:all)")
            value = f"glue:{name}"
        elif not Path(value).exists():
            raise UsageError(f"--task {value}: neither glue:NAME nor an existing task directory or file")
        if value not in out:
            out.append(value)
    return out


def load_task(value: str, opts: LocalTaskOptions) -> LoadedTask:
    """Load and check one ``--task`` value (after `expand_tasks`)."""
    if value.startswith("glue:"):
        task = _load_glue(value.split(":", 1)[1], opts.glue_source)
    else:
        task = _load_local(value, opts)
    return _encode_labels(task, opts.task_type if not value.startswith("glue:") else "auto")


# ------------------------------------------------------------------------------------------ GLUE


def _load_glue(name: str, source: str) -> LoadedTask:
    spec = TaskSpec(name=f"glue:{name}", **GLUE[name])
    splits = (spec.train_split, *spec.eval_splits)
    if Path(source).is_dir():
        data = {
            s: _read_files(_mirror_files(Path(source), name, s), f"--glue-source {source}") for s in splits
        }
    else:
        data = _load_hub(source, name, splits)
    _check_columns(spec, data, f"glue:{name} ({source})")
    return LoadedTask(spec, data[spec.train_split], {s: data[s] for s in spec.eval_splits}, source)


def _mirror_files(root: Path, config: str, split: str) -> list[Path]:
    """The parquet files of one split in a directory laid out like the hub's ``nyu-mll/glue``."""
    files = sorted((root / config).glob(f"{split}-*.parquet")) or sorted(
        (root / config).glob(f"{split}.parquet")
    )
    if not files:
        raise UsageError(f"--glue-source {root}: no {config}/{split}-*.parquet (a mirror of nyu-mll/glue)")
    return files


def _load_hub(repo: str, config: str, splits: tuple[str, ...]) -> dict:
    import datasets

    try:
        dd = datasets.load_dataset(repo, config)
    except Exception as e:  # no network, no such repository or config
        raise UsageError(
            f"--glue-source {repo}: cannot load config {config!r}: {str(e).splitlines()[0]}"
        ) from None
    missing = [s for s in splits if s not in dd]
    if missing:
        raise UsageError(f"--glue-source {repo}: config {config!r} has no split {missing[0]!r}")
    return {s: dd[s] for s in splits}


# ------------------------------------------------------------------------------------ local tasks


def _load_local(value: str, opts: LocalTaskOptions) -> LoadedTask:
    if not opts.text_fields:
        raise UsageError(f"--task {value}: a local task needs --text-fields A[,B]")
    path = Path(value)
    kind = REGRESSION if opts.task_type == REGRESSION else CLASSIFICATION
    spec = TaskSpec(
        name=path.stem if path.is_file() else path.name,
        text_fields=tuple(opts.text_fields),
        kind=kind,
        metrics=_default_metrics(kind),
        label_field=opts.label_field,
        train_split=opts.train_split,
        eval_splits=(opts.eval_split,),
    )  # fmt: skip
    if (path / "dataset_dict.json").is_file():
        data = _from_disk(path, (opts.train_split, opts.eval_split))
    else:
        data = {s: _read_files(_split_files(path, s, flag), flag) for s, flag in
                ((opts.train_split, "--train-split"), (opts.eval_split, "--eval-split"))}  # fmt: skip
    _check_columns(spec, data, f"--task {value}")
    return LoadedTask(spec, data[opts.train_split], {opts.eval_split: data[opts.eval_split]}, str(path))


def _default_metrics(kind: str) -> tuple[str, ...]:
    return ("pearson", "spearmanr") if kind == REGRESSION else ("accuracy", "macro_f1")


def _split_files(path: Path, split: str, flag: str) -> list[Path]:
    """A split's files: SPLIT as a file (absolute or in the task directory), SPLIT.EXT or SPLIT-*.EXT there."""
    root = path if path.is_dir() else path.parent
    for candidate in (Path(split), root / split):
        if candidate.is_file():
            return [candidate]
    for ext in FILE_FORMATS:
        files = sorted(root.glob(f"{split}{ext}")) or sorted(root.glob(f"{split}-*{ext}"))
        if files:
            return files
    raise UsageError(f"{flag} {split}: no such split in {root} (a file, or {split}.csv/.tsv/.jsonl/.parquet)")


def _read_files(files: list[Path], what: str) -> Dataset:
    import datasets

    ext = files[0].suffix.lower()
    if ext not in FILE_FORMATS:
        raise UsageError(f"{what}: {files[0]} is not csv, tsv, json, jsonl or parquet")
    kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
    try:
        return datasets.load_dataset(
            FILE_FORMATS[ext], data_files=[str(f) for f in files], split="train", **kwargs
        )
    except Exception as e:
        raise UsageError(f"{what}: cannot read {files[0]}: {str(e).splitlines()[0]}") from None


def _from_disk(path: Path, splits: tuple[str, str]) -> dict:
    import datasets

    dd = datasets.load_from_disk(str(path))
    for split, flag in zip(splits, ("--train-split", "--eval-split"), strict=True):
        if split not in dd:
            raise UsageError(f"{flag} {split}: {path} has no such split (it has {', '.join(dd)})")
    return {s: dd[s] for s in splits}


def _check_columns(spec: TaskSpec, data: dict, where: str) -> None:
    for split, ds in data.items():
        for name, flag in [(f, "--text-fields") for f in spec.text_fields] + [
            (spec.label_field, "--label-field")
        ]:
            if name not in ds.column_names:
                raise UsageError(
                    f"{flag}: {where} split {split!r} has no field {name!r} (it has {', '.join(ds.column_names)})"
                )
        if len(ds) == 0:
            raise UsageError(f"{where}: split {split!r} is empty")


# ----------------------------------------------------------------------------------------- labels


def _encode_labels(task: LoadedTask, task_type: str) -> LoadedTask:
    """The label column as int ids (classification) or floats (regression), checked against the spec."""
    spec, lf = task.spec, task.spec.label_field
    train_labels = task.train[lf]
    kind = _infer_kind(train_labels, task_type, spec)
    if kind == REGRESSION:
        spec = replace(spec, kind=REGRESSION, num_labels=1, metrics=_regression_metrics(spec))
        convert = float
    else:
        names = _label_names(train_labels, spec)
        feature = task.train.features.get(lf)
        shown = getattr(feature, "names", None) or names  # a ClassLabel's names (GLUE: negative, positive)
        shown = shown if len(shown) == len(names) else names
        spec = replace(spec, num_labels=spec.num_labels or len(names), label_names=tuple(map(str, shown)))
        index = {v: i for i, v in enumerate(names)}
        for split, ds in {spec.train_split: task.train, **task.evals}.items():
            unknown = next((v for v in ds[lf] if v not in index and v != -1), None)
            if unknown is not None:
                raise UsageError(
                    f"--label-field {lf}: split {split!r} has label {unknown!r}, which the training split "
                    f"does not (labels: {', '.join(map(str, names))})"
                )
        convert = index.__getitem__

    def encode(ds):
        ds = ds.filter(lambda v: v is not None and v != -1, input_columns=[lf])  # GLUE's unlabelled rows
        return ds.map(lambda v: {"label": convert(v)}, input_columns=[lf], remove_columns=_drop(ds, lf))

    evals = {s: encode(d) for s, d in task.evals.items()}
    return LoadedTask(spec, encode(task.train), evals, task.source)


def _drop(ds, lf: str) -> list[str]:
    return [lf] if lf != "label" else []


def _regression_metrics(spec: TaskSpec) -> tuple[str, ...]:
    return spec.metrics if spec.kind == REGRESSION else _default_metrics(REGRESSION)


def _infer_kind(labels: list, task_type: str, spec: TaskSpec) -> str:
    values = [v for v in labels if v is not None]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    fractional = numeric and any(float(v) != int(v) for v in values)
    want = spec.kind if task_type == "auto" and spec.name.startswith("glue:") else task_type
    if want == REGRESSION and not numeric:
        sample = next(v for v in values if not isinstance(v, int | float))
        raise UsageError(f"--task-type regression: {spec.name} has a non-numeric label {sample!r}")
    if want == CLASSIFICATION and fractional:
        sample = next(v for v in values if float(v) != int(v))
        raise UsageError(
            f"--task-type classification: {spec.name} has a fractional label {sample!r} "
            "(a regression task: --task-type regression)"
        )
    if want == "auto":
        return REGRESSION if fractional else CLASSIFICATION
    return want


def _label_names(labels: list, spec: TaskSpec) -> list:
    values = sorted({v for v in labels if v is not None and v != -1}, key=lambda v: (str(type(v)), v))
    if all(isinstance(v, int | float) for v in values):
        values = [int(v) for v in values]
        if spec.num_labels and any(v < 0 or v >= spec.num_labels for v in values):
            raise UsageError(f"{spec.name}: labels {values} do not fit {spec.num_labels} classes")
        if values and values == list(range(len(values))) or spec.num_labels:
            return list(range(spec.num_labels or len(values)))
    if len(values) < 2:
        raise UsageError(f"--label-field {spec.label_field}: {spec.name} has {len(values)} distinct label(s)")
    return values
