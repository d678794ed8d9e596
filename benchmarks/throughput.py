"""Throughput: the costs that make offline distillation worth it, as side-by-side ratios in one run.

On the real MiniLM-L6 shapes (6 layers, hidden 384, vocabulary 30,522) and a 3-layer DistilBERT
student, at one micro-batch of B x L tokens:

1. the offline student step (store signals) against the online-KD step (teacher forward + full
   vocabulary KL) on the same batch;
2. precompute tokens/s against a bare teacher forward over the same batches (the writer's overhead);
3. the store reader's tokens/s (one worker) against what one training step consumes;
4. the loss path (`offline_kd.kernels`: Triton on CUDA, the chunked reference elsewhere) against
   naive eager PyTorch on the same logits.

Timings on this machine are noisy: each pair is measured interleaved and the median taken; quote
ratios. On a GPU the absolute numbers and peak memory are printed too.

    python benchmarks/throughput.py [--batch 16 --seq-len 128 --repeats 5 --device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import dense_kl  # noqa: E402  (the online-KD reference loss)
from train_step import setup_teacher, sync  # noqa: E402


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main() -> None:
    from offline_kd.kernels import distillation_logit_losses

    from offline_kd.demo import sample_corpus
    from offline_kd.loss import LossConfig
    from offline_kd.precompute import PrecomputeConfig, precompute
    from offline_kd.reader import ReaderConfig, StoreReader
    from offline_kd.store import SignalStore
    from offline_kd.student import build_student
    from offline_kd.train import DistillModule

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--sequences", type=int, default=64, help="sequences precomputed for the store")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-bf16", action="store_true", help="fp32 student/teacher compute")
    args = ap.parse_args()
    device = torch.device(args.device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=not args.no_bf16)
    tmp = Path(tempfile.mkdtemp(prefix="kd-throughput-"))
    teacher_dir = setup_teacher(tmp)
    rows: list[tuple[str, str, str]] = []

    # -- 2. precompute vs bare teacher forward -------------------------------------------------
    corpus = tmp / "corpus.txt"
    lines = sample_corpus().read_text(encoding="utf-8").splitlines()
    corpus.write_text("\n".join(lines[: args.sequences * 2]) + "\n", encoding="utf-8")
    store_url = str(tmp / "store.zarr")
    pre = precompute(
        PrecomputeConfig(
            teacher=str(teacher_dir), corpus=[str(corpus)], output=store_url, max_length=args.seq_len,
            top_k=64, views=1, hidden=True, batch_size=args.batch, shard_size=args.batch * 4,
            device=str(device), dtype="float32" if args.no_bf16 else "bfloat16", progress=False,
        )
    )  # fmt: skip
    store = SignalStore.open(store_url)
    data = store.read(0, 0, store.meta.num_sequences, fields=["masked_input_ids", "lengths"])
    from offline_kd.teacher import load_teacher

    teacher = load_teacher(
        str(teacher_dir), device=device, dtype="float32" if args.no_bf16 else "bfloat16"
    ).model
    ids = torch.from_numpy(data["masked_input_ids"].astype("int64"))
    lengths = torch.from_numpy(data["lengths"].astype("int64"))
    attn = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()

    def bare_forward():
        with torch.inference_mode():
            for i in range(0, len(ids), args.batch):
                teacher(
                    input_ids=ids[i : i + args.batch].to(device),
                    attention_mask=attn[i : i + args.batch].to(device),
                )

    bare_s = statistics.median(timed(bare_forward, device) for _ in range(2))
    # The teacher pass with masking and store writes; model load and corpus packing are excluded.
    pre_tps, bare_tps = pre.tokens / pre.loop_seconds, int(attn.sum()) / bare_s
    rows.append(("precompute tokens/s (teacher pass + store writes)", f"{pre_tps:,.0f}", ""))
    rows.append(
        ("bare teacher forward tokens/s", f"{bare_tps:,.0f}", f"precompute / bare = {pre_tps / bare_tps:.2f}")
    )

    # -- 1. offline vs online step ---------------------------------------------------------------
    bundle = build_student("distil", teacher_path=str(teacher_dir), vocab_size=0, max_positions=0)
    student = bundle.model.to(device).train()
    loss_cfg = LossConfig(alpha_kl=5.0, alpha_mlm=2.0, alpha_cos=1.0, temperature=2.0, kl_tail=True)
    module = DistillModule(student, loss_cfg)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    reader = StoreReader(ReaderConfig(url=store_url, micro_batch_size=args.batch, temperature=2.0))
    batch = {k: v.to(device) for k, v in next(iter(reader.epoch_batches(0))).items()}
    batch["hidden"] = batch["hidden"].float()
    real_tokens = int(batch["attention_mask"].sum())

    def offline_step():
        with torch.autocast(**amp):
            loss, _ = module(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def online_step():
        valid = batch["attention_mask"].bool()
        with torch.autocast(**amp):
            with torch.no_grad():
                t = teacher(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    output_hidden_states=True,
                )
            out = student(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
            )
            logits = out.logits[valid]
            kl = dense_kl(logits, t.logits[valid], 2.0)
            ce = F.cross_entropy(logits.float(), batch["labels"][valid], ignore_index=-100)
            h_s, h_t = out.hidden_states[-1][valid].float(), t.hidden_states[-1][valid].float()
            cos = (1 - F.cosine_similarity(h_s, h_t, dim=-1)).mean()
            loss = 5.0 * kl + 2.0 * ce + 1.0 * cos
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    offline_step(), online_step()  # warm-up
    off_t, on_t = [], []
    for _ in range(args.repeats):
        off_t.append(timed(offline_step, device))
        on_t.append(timed(online_step, device))
    off_s, on_s = statistics.median(off_t), statistics.median(on_t)
    rows.append(("offline student step, s", f"{off_s:.3f}", ""))
    rows.append(
        (
            "online-KD step (teacher fwd + full-vocab KL), s",
            f"{on_s:.3f}",
            f"offline / online = {off_s / on_s:.2f}",
        )
    )

    # -- 3. reader vs consumption ----------------------------------------------------------------
    def read_epoch():
        n = 0
        for b in reader.epoch_batches(0):
            n += int(b["attention_mask"].sum())
        return n

    t0 = time.perf_counter()
    n_read = read_epoch()
    reader_tps = n_read / (time.perf_counter() - t0)
    step_tps = real_tokens / off_s
    rows.append(("store reader tokens/s (1 worker)", f"{reader_tps:,.0f}", ""))
    rows.append(
        (
            "training consumption tokens/s",
            f"{step_tps:,.0f}",
            f"reader / consumption = {reader_tps / step_tps:.1f}",
        )
    )

    # -- 4. loss path vs naive eager -------------------------------------------------------------
    n, V, k = real_tokens, teacher.config.vocab_size, 64
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(n, V, generator=g)).to(device, torch.bfloat16).requires_grad_()
    t_logits = torch.randn(n, k, generator=g).sort(-1, descending=True).values.to(device)
    t_ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(n)]).to(device)
    t_lse = (t_logits[:, 0] + 4.0).to(device)
    labels = torch.randint(V, (n,), generator=g).to(device)

    def fused():
        kl, ce = distillation_logit_losses(logits, t_ids, t_logits, 2.0, teacher_lse=t_lse, mlm_labels=labels)
        (kl + ce).backward()

    def naive():
        s = torch.log_softmax(logits.float() / 2.0, -1)
        p_log = t_logits / 2.0 - t_lse[:, None]
        p = p_log.exp()
        q_k = s.gather(1, t_ids)
        tail_p = (1 - p.sum(-1)).clamp_min(1e-30)
        tail_q = (1 - q_k.exp().sum(-1)).clamp_min(1e-30)
        kl = 4.0 * ((p * (p_log - q_k)).sum(-1) + tail_p * (tail_p.log() - tail_q.log())).mean()
        ce = F.cross_entropy(logits.float(), labels)
        (kl + ce).backward()

    fused(), naive()
    f_t, n_t = [], []
    for _ in range(args.repeats):
        f_t.append(timed(fused, device))
        n_t.append(timed(naive, device))
    f_s, n_s = statistics.median(f_t), statistics.median(n_t)
    path = "Triton" if device.type == "cuda" else "chunked reference"
    rows.append((f"loss fwd+bwd, {path} ({n}x{V}), s", f"{f_s:.4f}", ""))
    rows.append(("loss fwd+bwd, naive eager, s", f"{n_s:.4f}", f"naive / {path} = {n_s / f_s:.2f}x"))

    print(f"\nThroughput ({device.type}, {torch.get_num_threads()} threads, batch {args.batch}x{args.seq_len}, "
          f"{'fp32' if args.no_bf16 else 'bf16'}; teacher MiniLM-L6-H384, student 3 layers)\n")  # fmt: skip
    print("| measurement | value | ratio |\n|---|---|---|")
    for name, value, ratio in rows:
        print(f"| {name} | {value} | {ratio} |")
    if device.type == "cuda":
        print(f"\npeak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
