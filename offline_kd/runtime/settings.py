"""Every user-facing setting, declared once: type, default and help.

The command-line options of ``kd precompute``, ``kd eval`` and ``cli/train.py`` are generated from
these dataclasses (`offline_kd.runtime.options`). They live apart from the code that uses them so that
building a command line imports no torch: ``kd --help`` stays instant. Each stage re-exports its
own (`offline_kd.precompute.run.PrecomputeConfig`, `offline_kd.train.loss.LossConfig`,
`offline_kd.train.loop.TrainConfig`, `offline_kd.publish.evaluate.EvalConfig`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from offline_kd.runtime.options import setting

DTYPES = ("auto", "float32", "bfloat16", "float16")
HIDDEN_DTYPES = ("float16", "bfloat16", "float8_e4m3fn")
HIDDEN_CODECS = (
    "none",
    "zstd",
)  # offline_kd.store.signal_store.CODECS; "none" is the schema's choice for `hidden`
KL_SOURCES = ("auto", "topk", "exact")
TEACHER_HEAD_DTYPES = ("float16", "bfloat16", "float32")


def storage_options_setting(group: str | None = None):
    """``--storage-option KEY=VALUE``: the one declaration behind every command that opens a store."""
    return setting(
        None,
        "fsspec option for the store, e.g. endpoint_url=http://host:9000 or anon=true (repeatable; "
        "dotted keys nest: client_kwargs.region_name=X). Credentials: the filesystem's environment "
        "variables (AWS_ACCESS_KEY_ID, ...).",
        flags=("--storage-option",),
        metavar="KEY=VALUE",
        group=group,
    )


@dataclass
class StoreAccess:
    """How ``kd inspect`` and ``kd verify`` reach a store."""

    storage_options: dict | None = storage_options_setting()


@dataclass
class VerifyConfig:
    """``kd verify``: every chunk decoded (crc32c), values and completeness checked; optionally the teacher
    rerun (``--teacher``) or the logits recomputed through the stored head (``--exact``) on a sample."""

    teacher: str | None = setting(None, "Rerun this teacher on sampled sequences and compare.")
    exact: bool = setting(
        False,
        "Recompute the logits of the sampled sequences from the stored hidden states through the stored "
        "head (or --teacher's, for a store without one) and compare them with the stored top-k and lse.",
    )
    sample: int = setting(8, "Sequences to rerun with --teacher / --exact.")
    device: str | None = setting(None, "Where a rerun runs (default: cpu).")
    dtype: str = setting("float32", "Teacher compute dtype of a rerun.", choices=DTYPES)
    tolerance: float = setting(1e-3, "Max abs difference allowed.")
    revision: str | None = setting(None, "Teacher revision (branch, tag or commit) on the hub.")
    trust_remote_code: bool = setting(False, "Run the teacher repository's own code (off unless asked).")
    storage_options: dict | None = storage_options_setting()


@dataclass
class DemoConfig:
    """``kd demo``: the whole pipeline on the embedded sample corpus."""

    output: str = setting("runs/demo", "Directory for every artifact.")
    budget: str = setting(
        "full", "tiny: a smoke run in about a minute (what CI runs).", choices=("full", "tiny")
    )


@dataclass
class PrecomputeConfig:
    """The teacher pass: corpus → masked views → teacher signals → signal store."""

    teacher: str = setting(help="HF masked-LM name or local directory.")
    corpus: list[str] = setting(
        help="Text/jsonl/parquet file, dataset directory, hub dataset [ORG/]NAME[@REVISION][:CONFIG[:SPLIT]] or "
        "hf://datasets/ORG/NAME[@REVISION][/FILES] (repeatable)."
    )
    output: str = setting(help="Store path or fsspec URL (e.g. s3://bucket/store.zarr).")
    text_field: str | None = setting(None, "Field holding the text in jsonl/parquet (default: text).")
    group_rows: dict | None = setting(
        None,
        "Join every N consecutive rows of corpus SOURCE into one document, for sources with a sentence a "
        "row (BookCorpus); SOURCE as given to --corpus or its dataset name (repeatable).",
        flags=("--group-rows",),
        metavar="SOURCE=N",
    )
    num_proc: int | None = setting(None, "Processes that load, tokenize and filter the corpus (default: 1).")
    cache_dir: str | None = setting(
        None,
        "Directory every rank can read where rank 0 prepares the corpus once for several ranks "
        "(default: STORE.corpus beside a local store; required for a remote store with several ranks).",
    )
    max_length: int = setting(512, "Tokens per packed sequence.")
    top_k: int = setting(64, "Teacher logits kept per token (0: none, a store for the exact KL source only).")
    temperatures: list[float] = setting(
        factory=lambda: [1.0, 2.0], help="Comma-separated temperatures to store the log-sum-exp at."
    )
    views: int = setting(1, "Independently masked views per sequence.")
    hidden: bool = setting(True, "Store the last hidden state.")
    hidden_dtype: str = setting(
        "float16", "Stored dtype of the hidden states (docs/store-format.md).", choices=HIDDEN_DTYPES
    )
    hidden_codec: str = setting(
        "none",
        "Compressor of the hidden states (every chunk keeps its crc32c): none, or zstd (level 1), which saves "
        "24% of them from a bf16 teacher pass and 8% from fp32 for about twice the writer's CPU "
        "(docs/store-format.md).",
        choices=HIDDEN_CODECS,
    )
    store_head: bool = setting(True, "Store the teacher's MLM head with the hidden states (exact KL source).")
    mask_smoothing: float | None = setting(None, "Rarity smoothing exponent (DistilBERT: 0.7).")
    mlm_probability: float = setting(0.15, "Fraction of tokens masked.", cli=False)
    seed: int = setting(0, "Packing and masking seed.")
    batch_size: int = setting(32, "Sequences per teacher forward pass.")
    shard_size: int = setting(256, "Sequences per shard (unit of work).")
    chunk_size: int | None = setting(None, "Sequences per chunk (default: ~2 MB chunks).")
    writer_threads: int | None = setting(
        None,
        "Threads that encode and write finished shards while the teacher runs (several shards in flight, "
        "committed in order; default: the CPUs this process may use divided by the ranks on this node, "
        "1 to 4).",
    )
    dtype: str = setting("auto", "Teacher compute dtype.", choices=DTYPES)
    device: str | None = setting(
        None, "Default: cuda:$LOCAL_RANK (under srun cuda:$SLURM_LOCALID) if available, else cpu."
    )
    rank: int | None = setting(None, "Default: $RANK, else $SLURM_PROCID, else 0.")
    world_size: int | None = setting(None, "Default: $WORLD_SIZE, else $SLURM_NTASKS, else 1.")
    holdout: float = setting(0.0, "Fraction of documents held out.")
    holdout_file: str | None = setting(None, "Write held-out documents here, one per line.")
    overwrite: bool = setting(False, "Replace an existing store made with other settings.")
    dry_run: bool = setting(
        False,
        "Estimate the store size from a sample of the corpus, check free local disk space and the "
        "store URL; load no teacher weights, write nothing.",
    )
    dry_run_documents: int = setting(1000, "Documents per corpus source the dry run tokenizes.")
    trust_remote_code: bool = setting(False, "Run the teacher repository's own code (off unless asked).")
    hub_kernels: bool = setting(
        False,
        "Let transformers replace the teacher's layers with Hugging Face hub kernels (off: the layers its "
        "checkpoint defines; recorded in the store).",
    )
    revision: str | None = setting(None, "Teacher revision (branch, tag or commit) on the hub.")
    storage_options: dict | None = storage_options_setting()
    progress: bool = setting(
        True,
        "Rank 0 shows a progress bar on a terminal (without one, or with --no-progress: a line every 30 s).",
    )
    wait_timeout: float = setting(
        10800.0, "Seconds ranks > 0 wait for rank 0 to prepare the corpus and to create the store."
    )
    compile: bool = setting(False, "torch.compile the teacher (faster on a GPU after a one-off compile).")
    lease_seconds: float = setting(
        120.0,
        "Seconds after its last heartbeat that a vanished writer's lease on its store rank expires "
        "(a writer on this machine whose process is gone releases it at once).",
    )


@dataclass
class LossConfig:
    """The DistilBERT triple loss ``alpha_kl·KL + alpha_mlm·MLM + alpha_cos·cosine``."""

    alpha_kl: float = setting(5.0, "weight of the distillation KL", deprecated=("--alpha-ce",), at_least=0)
    alpha_mlm: float = setting(2.0, "weight of the MLM cross-entropy", at_least=0)
    alpha_cos: float = setting(1.0, "weight of the hidden-state cosine loss", at_least=0)
    kl_source: str = setting(
        "auto",
        "teacher distribution of the KL: 'exact' (the full vocabulary, recomputed from the stored hidden "
        "states through the teacher's MLM head; any T), 'topk' (stored top-k logits + log-sum-exp) or "
        "'auto' (exact when the store holds hidden states and the teacher's head, else topk)",
        choices=KL_SOURCES,
    )
    temperature: float = setting(
        2.0, "distillation temperature (topk + tail-aware: one of the store's)", above=0
    )
    kl_tail: bool = setting(
        True, "topk: tail-aware KL (the stored log-sum-exp gives the teacher's tail mass)"
    )
    restrict_kl_to_mask: bool = setting(False, "KL and cosine over masked tokens only")
    fused_head: bool = setting(
        True,
        "the student's output layer applied inside the loss, chunk by chunk of the rows that count: no [N, V] "
        "logits of either model, no padding through either head (--no-fused-head: the unfused reference)",
    )
    head_chunk_rows: int = setting(
        0, "rows per chunk of the fused head (0: about 2^23 logits, a multiple of 64)", at_least=0
    )
    teacher_head_dtype: str = setting(
        "float16",
        "exact: the input precision of the teacher head's matmuls, accumulated in fp32 ('float16', "
        "'bfloat16', or 'float32' for the fp32 head)",
        choices=TEACHER_HEAD_DTYPES,
    )

    def as_dict(self) -> dict:
        return asdict(self)


_IO, _STUDENT, _SCHEDULE = "inputs and outputs", "student", "schedule"


@dataclass
class DataConfig:
    """The store reader (`offline_kd.train.reader`)."""

    num_workers: int = setting(0, "DataLoader reader processes", at_least=0)
    buffer_chunks: int = setting(4, "store chunks per shuffle buffer", at_least=1)


@dataclass
class CheckpointConfig:
    """The checkpointer (`offline_kd.train.checkpoint.Checkpointer`): when it saves and what it keeps."""

    save_every: int = setting(0, "checkpoint every N optimizer steps (0: never)", at_least=0)
    save_every_minutes: float = setting(
        30.0,
        "also checkpoint once this many minutes have passed since the last checkpoint, so a preempted or "
        "crashed job loses at most that much (0: never)",
        at_least=0,
    )
    keep_checkpoints: int | None = setting(None, "keep only the newest N checkpoints", at_least=1)
    resume: bool = setting(False, "continue from the newest complete checkpoint")
    trust_run_dir: bool = setting(
        False,
        "with --resume, let DeepSpeed unpickle its checkpoint files (which runs any code they hold) instead of "
        "the weights-only load that refuses anything but tensors and DeepSpeed's own states; only for a run "
        "directory you wrote whose checkpoints need more",
    )


@dataclass
class LogConfig:
    """Rank 0's logs (`offline_kd.train.metrics.MetricsLogger`) and debugging output."""

    progress: bool = setting(
        True, "rank 0 shows a progress bar on a terminal (without one, or with --no-progress: plain lines)"
    )
    log_every: int = setting(
        50, "a plain progress line every N optimizer steps (0: by time only)", at_least=0
    )
    log_every_seconds: float = setting(60.0, "a plain progress line at least every S seconds", above=0)
    tensorboard: bool = setting(True, "write TensorBoard events under logs/tb")
    debug_param_hash: bool = setting(False, "each rank writes a hash of its parameters")


@dataclass
class HeldOutConfig:
    """The held-out evaluator (`offline_kd.train.heldout.HeldOutEvaluator`): what it scores and when."""

    eval_corpus: str | None = setting(
        None,
        "held-out text/jsonl/parquet file (masked accuracy, perplexity) or signal store (also agreement "
        "with the teacher's stored top-1) scored during training and for the model card",
    )
    eval_every: int = setting(0, "evaluate every N optimizer steps (0: once, at the end)", at_least=0)
    eval_max_sequences: int | None = setting(256, "score at most N held-out sequences", at_least=1)


@dataclass
class CardConfig:
    """The exported student's model card and where it is published (`offline_kd.train.export`)."""

    license: str | None = setting(None, "model card license, e.g. apache-2.0; none: the local teacher card's")
    language: list[str] | None = setting(
        None, "model card language, e.g. en (repeatable); none: the local teacher card's"
    )
    push_to_hub: str | None = setting(None, "upload final/ to this hub model repository (owner/name)")


@dataclass
class TrainConfig:
    """Training a student from a signal store with DeepSpeed: the run's own settings, then one section
    per component (loss, reader, checkpointer, logs, held-out evaluator, model card)."""

    store: str = setting(help="signal store URL (local path or fsspec URL)", group=_IO)
    student: str = setting(
        help="'distil', 'distil-<n>l', a preset (tiny, tiny-narrow, mini, small, distilbert-base) or a HF "
        "model directory / config.json",
        group=_IO,
    )
    output: str = setting(help="run directory (checkpoints, logs, final/)", group=_IO)
    deepspeed_config: str | dict | None = setting(
        None,
        "DeepSpeed JSON file, or a shipped config by name (ds_distilbert, ds_cpu_tiny); none: ds_cpu_tiny",
        flags=("--deepspeed_config", "--deepspeed-config"),
        group=_IO,
    )
    teacher: str | None = setting(None, "teacher path; none: the one the store records", group=_IO)
    overwrite: bool = setting(
        False,
        "start again in an earlier run's --output: its checkpoints, logs and final/ are deleted first (files "
        "this tool did not write stay)",
        group=_IO,
    )
    storage_options: dict | None = storage_options_setting(group=_IO)
    init_layers: str | None = setting(None, "teacher layers to copy, e.g. 0,2,4,7,9,11", group=_STUDENT)
    init_from_teacher: bool = setting(False, "copy teacher tensors whose shapes match", group=_STUDENT)
    hidden_projection: bool = setting(False, "learn a student→teacher width projection", group=_STUDENT)
    hub_kernels: bool = setting(
        False,
        "let transformers replace the student's and teacher's layers with Hugging Face hub kernels (off: "
        "the layers their checkpoints define)",
        group=_STUDENT,
    )
    collective_timeout: float = setting(
        1800.0,
        "seconds a collective waits for every rank: a rank that stops answering (hung, stopped, its node "
        "gone) ends the job after it, named in one line",
        group=_SCHEDULE,
        above=0,
    )
    epochs: int = setting(3, "epochs; epoch e replays mask view e mod views", group=_SCHEDULE, at_least=1)
    max_steps: int | None = setting(
        None,
        "stop after this many optimizer steps (the LR schedule is unchanged)",
        group=_SCHEDULE,
        at_least=1,
    )
    schedule_steps: int | None = setting(
        None, "LR schedule length for 'auto' total steps", group=_SCHEDULE, at_least=1
    )
    micro_batch_size: int | None = setting(
        None, "overrides train_micro_batch_size_per_gpu", group=_SCHEDULE, at_least=1
    )
    gradient_accumulation_steps: int | None = setting(
        None, "overrides the JSON's gradient_accumulation_steps", group=_SCHEDULE, at_least=1
    )
    lr: float | None = setting(None, "overrides the optimizer's lr", group=_SCHEDULE, above=0)
    warmup_fraction: float = setting(
        0.05, "warm-up share of an 'auto' schedule", group=_SCHEDULE, at_least=0, below=1
    )
    seed: int = setting(0, "student initialisation and data order", group=_SCHEDULE)
    loss: LossConfig = setting(factory=LossConfig, group="loss")
    data: DataConfig = setting(factory=DataConfig, group="data")
    checkpoint: CheckpointConfig = setting(factory=CheckpointConfig, group="checkpoints")
    logs: LogConfig = setting(factory=LogConfig, group="logs")
    heldout: HeldOutConfig = setting(factory=HeldOutConfig, group="held-out evaluation")
    card: CardConfig = setting(factory=CardConfig, group="model card")
    local_rank: int | None = setting(
        None, "set by the deepspeed launcher", flags=("--local_rank", "--local-rank"), hidden=True
    )

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalConfig:
    """``kd eval``: deterministic masked-LM scoring of a model on held-out text."""

    model: str = setting(help="Masked-LM directory (save_pretrained) to score.")
    corpus: list[str] = setting(help="Held-out text/jsonl/parquet file(s).")
    teacher: str | None = setting(None, "Also report top-1 agreement and KL(teacher||model) at T=1.")
    text_field: str | None = setting(None, "Field holding the text in jsonl/parquet records.")
    max_length: int | None = setting(
        None, "Tokens per packed sequence (default: the model's; a student trained here records its store's)."
    )
    seed: int = setting(0, "Masking seed.")
    hub_kernels: bool = setting(
        False, "Let transformers replace layers with Hugging Face hub kernels (off: the checkpoint's own)."
    )
    batch_size: int = setting(16, "Sequences per forward pass.")
    max_sequences: int | None = setting(None, "Score only the first N packed sequences.")
    device: str | None = setting(
        None, "cpu, cuda, cuda:1 ... (default: cuda:$LOCAL_RANK if available, else cpu)."
    )
    update_card: bool = setting(
        False, "Record the results as the held-out evaluation of MODEL/README.md's model card."
    )


@dataclass
class FinetuneConfig:
    """``kd finetune``: fine-tune models on downstream tasks and report each against the teacher."""

    model: list[str] = setting(
        help="A model to fine-tune: an exported student, any AutoModelForMaskedLM directory or hub name "
        "(bert-base-uncased); NAME=PATH names it in the report (repeatable)."
    )
    task: list[str] = setting(
        help="glue:NAME (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli), glue:all, or a local task: a "
        "directory of split files (csv, tsv, jsonl, parquet; or datasets' save_to_disk) (repeatable)."
    )
    teacher: str | None = setting(
        None, "The reference model (a directory or hub name; NAME=PATH): retention is each model / teacher."
    )
    output: str = setting("runs/finetune", "Directory for results, the report and resumable cells.")
    glue_source: str = setting(
        "nyu-mll/glue", "Where glue:NAME is read: a hub dataset repository, or a local directory laid out "
        "like nyu-mll/glue (CONFIG/SPLIT-*.parquet)."
    )  # fmt: skip
    text_fields: str | None = setting(None, "Local task: the text field(s), A or A,B for sentence pairs.")
    label_field: str = setting("label", "Local task: the label field.")
    train_split: str = setting(
        "train", "Local task: the training split (a name in the directory, or a file)."
    )
    eval_split: str = setting("validation", "Local task: the evaluation split (a name, or a file).")
    task_type: str = setting(
        "auto", "Local task: classification or regression (auto: regression for fractional labels).",
        choices=("auto", "classification", "regression"),
    )  # fmt: skip
    max_length: int = setting(128, "Tokens per example (longer ones are truncated).")
    batch_size: int = setting(32, "Training examples per step (per device).")
    eval_batch_size: int = setting(128, "Examples per evaluation forward pass.")
    lr: float = setting(2e-5, "Peak learning rate (AdamW, linear decay).")
    epochs: float = setting(3.0, "Training epochs.")
    warmup: float = setting(0.1, "Warm-up, as a fraction of the training steps.")
    weight_decay: float = setting(0.01, "AdamW weight decay.")
    max_steps: int | None = setting(None, "Stop after this many steps (overrides --epochs).")
    max_train_samples: int | None = setting(None, "Train on the first N examples of the training split.")
    max_eval_samples: int | None = setting(None, "Evaluate on the first N examples of each eval split.")
    seeds: int = setting(1, "Seeds per (model, task): the report gives the median and the spread.")
    seed: int = setting(42, "The first seed; the others follow it.")
    precision: str = setting(
        "auto", "auto: bf16 on a GPU that has it, else fp32.", choices=("auto", "fp32", "bf16", "fp16")
    )
    cpu: bool = setting(False, "Train on the CPU even where a GPU is present.")
    speed: bool = setting(True, "Measure size and speed: parameters, weights on disk, latency, throughput.")
    latency_samples: int = setting(64, "Eval examples timed one at a time (batch 1) on the CPU per model.")
    throughput_batch: int = setting(256, "Batch of the GPU throughput measurement (when CUDA is present).")
    update_card: bool = setting(False, "Record the results in each local model's README.md model card.")
    progress: bool = setting(
        True, "A progress bar on a terminal (without one: a line every 30 s), with an ETA."
    )
    hub_kernels: bool = setting(
        False, "Let transformers replace layers with Hugging Face hub kernels (off: the checkpoint's own)."
    )
