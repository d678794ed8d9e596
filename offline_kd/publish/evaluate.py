"""`kd eval`: score a masked LM on held-out text with deterministic masking.

Each packed sequence is masked once with the store's procedure (15%, 80/10/10) under a fixed seed,
so every model evaluated with the same corpus, length and seed sees exactly the same inputs.
Metrics are taken over the masked positions:

- top-1 / top-5 accuracy of the original token;
- masked perplexity: exp of the mean cross-entropy of the original token, from this one masked
  pass (the usual MLM perplexity; not the literature's pseudo-perplexity, which masks one token
  at a time);
- with a teacher: top-1 agreement with the teacher's prediction, and the mean KL(teacher || model)
  at T = 1 over the full vocabulary.

Until the next version, `EvalResult.as_dict` (``kd eval --json``) also reports masked perplexity
under its former key ``pseudo_perplexity``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from offline_kd.publish.checks import check_eval
from offline_kd.runtime.distributed import local_device
from offline_kd.runtime.errors import UsageError
from offline_kd.runtime.hub_kernels import load_kwargs as hub_kernel_kwargs
from offline_kd.runtime.settings import EvalConfig


@dataclass
class EvalResult:
    sequences: int
    masked_tokens: int
    accuracy: float
    top5_accuracy: float
    masked_perplexity: float
    teacher_agreement: float | None = None
    kl_teacher_student: float | None = None

    @property
    def pseudo_perplexity(self) -> float:
        """Deprecated name of `masked_perplexity`."""
        return self.masked_perplexity

    def as_dict(self) -> dict:
        """The fields, plus ``pseudo_perplexity`` (the former key of masked perplexity)."""
        return {**asdict(self), "pseudo_perplexity": self.masked_perplexity}


def _load(path: str, device: torch.device, hub_kernels: bool = False):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForMaskedLM.from_pretrained(path, **hub_kernel_kwargs(hub_kernels)).to(device).eval()
    return model, tokenizer


def masked_eval_batches(cfg: EvalConfig, tokenizer, max_length: int | None = None):
    """Yield (masked_ids, attention_mask, labels) batches: the deterministic evaluation inputs."""
    from offline_kd.data.corpus import load_documents, pack_sequences
    from offline_kd.data.masking import MaskingConfig, mask_batch

    docs = load_documents(cfg.corpus, text_field=cfg.text_field)
    packed = pack_sequences(docs, tokenizer, max_length=max_length or cfg.max_length, seed=cfg.seed)
    n = len(packed) if cfg.max_sequences is None else min(len(packed), cfg.max_sequences)
    if n == 0:
        raise ValueError(f"no evaluation sequences could be built from {cfg.corpus}")
    special = sorted(set(tokenizer.all_special_ids))
    masking = MaskingConfig()
    for start in range(0, n, cfg.batch_size):
        stop = min(start + cfg.batch_size, n)
        rows = packed[start:stop]
        ids = np.asarray(rows["input_ids"], dtype=np.int64)
        lengths = np.asarray(rows["length"], dtype=np.int64)
        masked, mlm = mask_batch(
            ids, lengths, masking, special, len(tokenizer), tokenizer.mask_token_id,
            cfg.seed, range(start, stop), view=0,
        )  # fmt: skip
        labels = np.where(mlm, ids, -100)
        attention = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        yield torch.from_numpy(masked), torch.from_numpy(attention), torch.from_numpy(labels)


@torch.inference_mode()
def evaluate(cfg: EvalConfig) -> EvalResult:
    max_length = check_eval(cfg)  # every input, and the default --max-length, before a model loads
    device = torch.device(local_device(cfg.device))
    model, tokenizer = _load(cfg.model, device, cfg.hub_kernels)
    teacher = None
    if cfg.teacher:
        teacher, teacher_tok = _load(cfg.teacher, device, cfg.hub_kernels)
        if teacher_tok.get_vocab() != tokenizer.get_vocab():
            raise UsageError(
                f"--teacher {cfg.teacher} and --model {cfg.model} use different vocabularies; "
                "agreement and KL need the same tokenizer"
            )

    n_seq = n_tok = top1 = top5 = agree = 0
    nll = kl = 0.0
    for masked, attention, labels in masked_eval_batches(cfg, tokenizer, max_length):
        masked, attention, labels = masked.to(device), attention.to(device), labels.to(device)
        sel = labels != -100
        logits = model(input_ids=masked, attention_mask=attention).logits[sel].float()
        target = labels[sel]
        n_seq += masked.shape[0]
        n_tok += int(target.numel())
        logp = torch.log_softmax(logits, dim=-1)
        nll += float(-logp.gather(1, target[:, None]).sum())
        best5 = logits.topk(5, dim=-1).indices
        top1 += int((best5[:, 0] == target).sum())
        top5 += int((best5 == target[:, None]).any(-1).sum())
        if teacher is not None:
            t_logits = teacher(input_ids=masked, attention_mask=attention).logits[sel].float()
            t_logp = torch.log_softmax(t_logits, dim=-1)
            agree += int((t_logits.argmax(-1) == best5[:, 0]).sum())
            kl += float((t_logp.exp() * (t_logp - logp)).sum())
    if n_tok == 0:
        raise ValueError(f"no masked tokens in the evaluation corpus {cfg.corpus}")
    return EvalResult(
        sequences=n_seq,
        masked_tokens=n_tok,
        accuracy=top1 / n_tok,
        top5_accuracy=top5 / n_tok,
        masked_perplexity=math.exp(nll / n_tok),
        teacher_agreement=agree / n_tok if teacher is not None else None,
        kl_teacher_student=kl / n_tok if teacher is not None else None,
    )


def format_table(rows: dict[str, EvalResult]) -> str:
    """A plain-text comparison table, one row per model."""
    head = f"{'model':<28} {'masked acc':>10} {'top-5':>7} {'masked ppl':>10} {'agree':>7} {'KL(t||s)':>9}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        agree = f"{100 * r.teacher_agreement:6.1f}%" if r.teacher_agreement is not None else f"{'-':>7}"
        kl = f"{r.kl_teacher_student:9.3f}" if r.kl_teacher_student is not None else f"{'-':>9}"
        lines.append(
            f"{name:<28} {100 * r.accuracy:9.1f}% {100 * r.top5_accuracy:6.1f}% "
            f"{r.masked_perplexity:10.2f} {agree} {kl}"
        )
    return "\n".join(lines)
