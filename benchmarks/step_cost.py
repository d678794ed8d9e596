"""What a distillation step costs, online against offline (top-k and exact), fused and unfused, side by side.

    python benchmarks/step_cost.py                        # every part (about 10 minutes on 2 CPU cores)
    python benchmarks/step_cost.py --parts model          # the FLOP and byte model alone (instant)
    python benchmarks/step_cost.py --parts steps,memory --batch 2 --seq-len 128 --repeats 3

Parts:

* **model**: FLOPs and V-wide bytes per token of each step at the bert-base shape (12-layer teacher, 6-layer
  student, H 768, FFN 3072, L 512, V 30,522 padded to 30,528), and the time they take on an H100 SXM's
  datasheet peaks (bf16 tensor cores 989 TFLOP/s, fp32 without tensor cores 67 TFLOP/s, HBM 3.35 TB/s),
  as the sum of compute and memory time. The exact step's teacher head appears twice: with reduced-precision
  inputs (tensor cores, what training runs) and in fp32 (what it ran before).
* **steps**: CPU seconds of one forward + backward of each step on a random bert-base-shaped teacher and
  student (`DistillModule`, the trainer's module; the online step runs the teacher forward, then the same
  losses against its logits), fused (the default) and unfused (`--no-fused-head`), interleaved, medians.
* **memory**: the extra peak memory of the loss (both heads and the KL + MLM, forward and backward) per
  token, fused and unfused, by the RSS method of tests/test_kernels_memory.py, against the bound
  2 × chunk × V × 4 bytes.
* **store**: benchmarks/store_io.py (write and read tokens per CPU-second, 1 and 2 threads).

Ratios measured here are this machine's; the model's are a GPU's. docs/results.md ("Step cost") explains
the differences.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from _common import interleaved_medians, markdown_table, memory_probe, mmap_large_blocks

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------- the model
BERT_BASE = dict(L=512, H=768, F=3072, V=30528, teacher_layers=12, student_layers=6, k=64)
H100 = dict(bf16=989e12, fp32=67e12, hbm=3.35e12)


def layer_flops(L: int, H: int, F: int) -> float:
    """Forward FLOPs per token of one encoder layer: QKV + output projections, FFN, attention scores and
    their weighted sum."""
    return 2 * (4 * H * H + 2 * H * F) + 2 * 2 * L * H


def head_flops(H: int, V: int) -> float:
    """Forward FLOPs per token of an MLM head: the H x H transform and the V x H decoder."""
    return 2 * H * H + 2 * H * V


def step_model(shape: dict = BERT_BASE) -> dict[str, dict]:
    """Per token: FLOPs by precision and HBM bytes of the V-wide tensors, for each step."""
    L, H, F, V = shape["L"], shape["H"], shape["F"], shape["V"]
    student = 3 * (shape["student_layers"] * layer_flops(L, H, F) + head_flops(H, V))  # forward + backward
    teacher_body = shape["teacher_layers"] * layer_flops(L, H, F)
    head = head_flops(H, V)
    # V-wide traffic per token, unfused: bf16 student logits written, read twice by the loss, the gradient
    # written over them and read by the two backward matmuls (12 V); the teacher's fp32 logits written and
    # read twice (12 V, exact) or its bf16 logits (6 V, online). Fused, the chunk stays in L2: no V-wide HBM
    # traffic. The store adds its bytes per token (hidden fp16: 2H; top-k: ids + logits + lse).
    topk_store, hidden_store = shape["k"] * 8 + 8, 2 * H
    return {
        "online, unfused": dict(bf16=student + teacher_body + head, fp32=0, bytes=(12 + 6) * V),
        "online, fused": dict(bf16=student + teacher_body + head, fp32=0, bytes=6 * V),
        "top-k, unfused": dict(bf16=student, fp32=0, bytes=12 * V + topk_store + hidden_store),
        "top-k, fused": dict(bf16=student, fp32=0, bytes=topk_store + hidden_store),
        "exact, fp32 head, unfused": dict(bf16=student, fp32=head, bytes=24 * V + hidden_store),
        "exact, fp16 head, unfused": dict(bf16=student + head, fp32=0, bytes=24 * V + hidden_store),
        "exact, fp16 head, fused": dict(bf16=student + head, fp32=0, bytes=hidden_store),
    }


def model_table(peaks: dict = H100) -> str:
    """FLOPs, bytes and modelled time per token of each step; ratios against online and top-k on the same
    path (fused against fused, unfused against unfused)."""
    steps = step_model()
    model_seconds = {
        n: s["bf16"] / peaks["bf16"] + s["fp32"] / peaks["fp32"] + s["bytes"] / peaks["hbm"]
        for n, s in steps.items()
    }
    rows = []
    for name, s in steps.items():
        path = name.rsplit(", ", 1)[1]
        online, topk = f"online, {path}", f"top-k, {path}"
        flops = s["bf16"] + s["fp32"]
        rows.append([
            name, f"{flops / 1e6:.1f}", f"{s['fp32'] / 1e6:.1f}", f"{s['bytes'] / 1e3:.0f}",
            f"{flops / (steps[online]['bf16'] + steps[online]['fp32']):.3f}",
            f"{flops / (steps[topk]['bf16'] + steps[topk]['fp32']):.3f}",
            f"{model_seconds[name] * 1e9:.0f}", f"{model_seconds[name] / model_seconds[online]:.3f}",
            f"{model_seconds[name] / model_seconds[topk]:.3f}",
        ])  # fmt: skip
    header = [
        "step (per token)", "MFLOP", "of which fp32", "V-wide + store kB", "FLOP / online", "FLOP / top-k",
        "ns on H100", "time / online", "time / top-k",
    ]  # fmt: skip
    return markdown_table(header, rows)


# --------------------------------------------------------------------------------------------- the steps
def bert_base_models(layers: int, student_layers: int, seq_len: int, vocab: int = 30522):
    """A random bert-base-shaped teacher (BertForMaskedLM) and a DistilBERT student of its shape."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from offline_kd.train.student import distilbert_from_bert, pad_vocabulary

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=max(512, seq_len))
    teacher = BertForMaskedLM(cfg).eval()
    student, _ = distilbert_from_bert(teacher, student_layers)
    pad_vocabulary(student)
    return teacher, student


def make_batch(teacher, batch: int, seq_len: int, k: int = 64):
    """A micro-batch as the reader gives it, with the teacher's signals computed from its own forward."""
    import torch

    from offline_kd.teacher.head import extract_head

    g = torch.Generator().manual_seed(1)
    device = next(teacher.parameters()).device
    ids = torch.randint(1000, 30000, (batch, seq_len), generator=g).to(device)
    mlm = (torch.rand(batch, seq_len, generator=g) < 0.15).to(device)
    with torch.no_grad():
        out = teacher(input_ids=ids, output_hidden_states=True)
    top = out.logits.topk(k, dim=-1)
    b = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), mlm_mask=mlm, labels=torch.where(mlm, ids, -100),
        topk_ids=top.indices.int(), topk_logits=top.values, lse=torch.logsumexp(out.logits / 2.0, -1),
        hidden=out.hidden_states[-1].half(),
    )  # fmt: skip
    return b, extract_head(teacher).module.to(device)


def step_functions(teacher, student, head, batch: dict) -> dict:
    """name -> a forward + backward of that step: offline through `DistillModule` (the trainer's module),
    online as `online_step`."""
    import torch

    from offline_kd.runtime.settings import LossConfig
    from offline_kd.teacher.reduced_head import ReducedPrecisionHead
    from offline_kd.train.loop import DistillModule
    from offline_kd.train.loss import loss_rows

    fast = ReducedPrecisionHead(head, torch.float16, device=next(head.parameters()).device)
    vocab = int(teacher.config.vocab_size)
    fns = {}
    for fused in (True, False):
        tag = "fused" if fused else "unfused"
        for source in ("topk", "exact"):
            cfg = LossConfig(kl_source=source, fused_head=fused)
            module = DistillModule(student, cfg, vocab_size=vocab, teacher_head=fast, fused=fused)
            b = dict(batch, loss_rows=loss_rows(cfg, batch))  # the trainer finds them on the host
            fns[f"{source}, {tag}"] = lambda m=module, b=b: _backward(m(b)[0], student)
        fns[f"online, {tag}"] = lambda f=fused: _backward(
            online_step(student, teacher, batch, vocab, f), student
        )
    return fns


def _backward(loss, student) -> None:
    loss.backward()
    student.zero_grad(set_to_none=True)


def online_step(student, teacher, batch: dict, vocab: int, fused: bool):
    """The online step: the teacher's forward, then the same KL + MLM (full vocabulary) and cosine losses
    against its logits and last hidden state, the student's output layer fused or not."""
    import torch

    from offline_kd.kernels import cosine_loss, dense_distillation_losses, fused_linear_exact_losses
    from offline_kd.train.output_layer import features_instead_of_logits

    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    t_logits = t_out.logits.reshape(-1, t_out.logits.shape[-1])
    labels, w = batch["labels"].reshape(-1), (5.0, 2.0)
    if fused:
        layer = student.vocab_projector
        with features_instead_of_logits(layer):
            out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        x = out.logits.reshape(-1, out.logits.shape[-1])
        parts = fused_linear_exact_losses(
            x, layer.weight, layer.bias, lambda a, b: t_logits[a:b], 2.0, mlm_labels=labels, weights=w,
            vocab_size=vocab,
        )  # fmt: skip
    else:
        out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        parts = dense_distillation_losses(
            out.logits, t_logits, 2.0, mlm_labels=labels, weights=w, vocab_size=vocab
        )
    s_h, t_h = out.hidden_states[-1], t_out.hidden_states[-1]
    return parts.total + cosine_loss(s_h.reshape(-1, s_h.shape[-1]), t_h.reshape(-1, t_h.shape[-1]))


def on_device(fns: dict, device: str) -> dict:
    """The step functions under bf16 autocast on a GPU (what the trainer's bf16 DeepSpeed config gives)."""
    import torch

    if device == "cpu":
        return fns

    def autocast(fn):
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                fn()

        return run

    return {name: autocast(fn) for name, fn in fns.items()}


def cpu_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median CPU seconds (`time.process_time`) of each function: one warm-up call each, then `repeats`
    rounds round-robin."""
    import statistics
    import time

    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.process_time()
            fn()
            times[name].append(time.process_time() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def steps_table(args) -> str:
    import torch

    teacher, student = bert_base_models(args.teacher_layers, args.student_layers, args.seq_len)
    teacher, student = teacher.to(args.device), student.to(args.device)
    batch, head = make_batch(teacher, args.batch, args.seq_len)
    fns = on_device(step_functions(teacher, student, head, batch), args.device)
    if args.device == "cpu":  # CPU seconds of this process, one thread: what other jobs do not change
        torch.set_num_threads(1)
        times = cpu_medians(fns, args.repeats)
    else:
        times = interleaved_medians(fns, args.repeats, args.device)
    rows = []
    for name, t in times.items():
        tag = name.split(", ")[1]
        rows.append(
            [name, f"{t:.3f}", f"{t / times[f'online, {tag}']:.3f}", f"{t / times[f'topk, {tag}']:.3f}"]
        )
    tokens = args.batch * args.seq_len
    unit = "CPU seconds (one thread)" if args.device == "cpu" else "seconds"
    return f"{tokens} tokens a step, {unit}, medians of {args.repeats}\n\n" + markdown_table(
        ["step", "s", "/ online (same path)", "/ top-k (same path)"], rows
    )


# -------------------------------------------------------------------------------------------- the memory
def memory_table(args) -> str:
    """Peak extra memory of the loss alone (the student's body runs before the probe is reset), with the
    student's output layer in bf16 as DeepSpeed's bf16 config holds it."""
    import torch

    from offline_kd.kernels.fused_head import default_chunk_rows
    from offline_kd.runtime.settings import LossConfig
    from offline_kd.teacher.reduced_head import ReducedPrecisionHead
    from offline_kd.train.loss import FusedHead, distillation_loss, loss_rows

    mmap_large_blocks()
    torch.set_num_threads(1)
    teacher, student = bert_base_models(1, 1, args.memory_seq_len)
    teacher = teacher.to(args.device)
    batch, head = make_batch(teacher, args.memory_batch, args.memory_seq_len)
    fast, vocab = ReducedPrecisionHead(head, torch.float16), 30522
    layer = student.vocab_projector.to(args.device, torch.bfloat16)
    shape = (args.memory_batch, args.memory_seq_len, layer.in_features)
    feats = torch.randn(shape, device=args.device, dtype=torch.bfloat16, requires_grad=True)
    n, V, rows = args.memory_batch * args.memory_seq_len, layer.out_features, []
    chunk, bound, acc = (
        default_chunk_rows(V, n),
        2 * default_chunk_rows(V, n) * V * 4,
        V * layer.in_features * 4,
    )
    for source in ("topk", "exact"):
        for fused in (True, False):
            cfg = LossConfig(kl_source=source, alpha_cos=0.0, fused_head=fused)
            b = dict(batch, loss_rows=loss_rows(cfg, batch))

            def call(cfg=cfg, b=b, fused=fused):
                x = feats if fused else layer(feats)  # unfused: the model's logits, made before the loss
                f = FusedHead(layer.weight, layer.bias) if fused else None
                loss, _ = distillation_loss(cfg, x, None, b, None, vocab, True, 1.0, fast, f)
                loss.backward()

            extra = {}
            for trains_layer in (
                False,
                True,
            ):  # frozen: what the logits cost; trained: + the layer's gradient
                layer.requires_grad_(trains_layer)
                extra[trains_layer] = _peak(call, lambda: [feats, layer.weight, layer.bias], args.device)
            rows.append([
                f"{source}, {'fused' if fused else 'unfused'}", f"{extra[False] / 2**20:.1f}",
                f"{extra[False] / n / 1e3:.1f}", f"{extra[False] / bound:.2f}", f"{extra[True] / 2**20:.1f}",
            ])  # fmt: skip
    note = (
        f"{n} tokens, V = {V:,}, H = {layer.in_features}, chunk = {chunk} rows; bound 2 x chunk x V x 4 = "
        f"{bound / 2**20:.1f} MiB; extra peak beyond the inputs' gradients. With the output layer trained, "
        f"the fused path also holds its weight gradient's fp32 accumulator ({acc / 2**20:.1f} MiB, the size "
        "of the weight, whatever the batch) next to the bf16 gradient it becomes."
    )
    header = [
        "loss",
        "extra peak MiB, layer frozen",
        "kB / token",
        "/ bound",
        "extra peak MiB, layer trained",
    ]
    return note + "\n\n" + markdown_table(header, rows)


def _peak(call, params, device: str) -> int:
    """Peak memory growth over `call` (RSS on a CPU, the allocator's peak on a GPU), less the gradients it
    leaves on `params()` (which any path has)."""
    reset, peak = memory_probe(device)
    call()  # warm-up: allocator pools, kernels' lazy state
    for p in params():
        p.grad = None
    reset()
    call()
    left = sum(p.grad.numel() * p.grad.element_size() for p in params() if p.grad is not None)
    for p in params():
        p.grad = None
    return peak() - left


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="model,steps,memory,store")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the steps under bf16 autocast)")
    ap.add_argument("--memory-batch", type=int, default=4, help="the memory part's micro-batch (sequences)")
    ap.add_argument("--memory-seq-len", type=int, default=512)
    ap.add_argument("--teacher-layers", type=int, default=12)
    ap.add_argument("--student-layers", type=int, default=6)
    args = ap.parse_args()
    parts = args.parts.split(",")
    if "model" in parts:
        print(
            "## Step cost by the model (bert-base shape, H100 SXM datasheet peaks)\n\n" + model_table() + "\n"
        )
    if "steps" in parts:
        where = (
            "this CPU (fp32; the teacher head's fp16 inputs emulated)"
            if args.device == "cpu"
            else "the GPU (bf16)"
        )
        print(f"## Steps measured on {where}\n\n" + steps_table(args) + "\n")
    if "memory" in parts:
        print("## Loss memory, bf16 student layer, extra peak (RSS on a CPU)\n\n" + memory_table(args) + "\n")
    if "store" in parts:
        print("## Store write and read\n", flush=True)
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "store_io.py"),
                "--repeats",
                "1",
                "--skip-zarr-writer",
            ],
            check=True,
        )


if __name__ == "__main__":
    main()
