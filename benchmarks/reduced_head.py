"""What the teacher head's reduced-precision inputs cost the exact KL's teacher distribution, on a real store.

For every real position of the first sequences of a store: the stored head in fp32 on the stored hidden
states (what the exact KL used before), against the same head with fp16 or bf16 matmul inputs and fp32
accumulation (`offline_kd.teacher.reduced_head.ReducedPrecisionHead`, what training runs now), and against
the teacher's own bf16 forward on the masked input the store recorded (what online KD with a bf16 teacher
sees). Prints KL(fp32 head ‖ other) at T = 1 and 2 (mean and max over positions), top-1 agreement and the
largest logit difference.

    python benchmarks/reduced_head.py --store STORE [--teacher DIR] [--sequences 64]

A store from the quick-fit MiniLM teacher of benchmarks/fidelity.py (cached under ~/.cache/offline_kd/teachers
by its first run) on the shipped Austen text:

    xz -dc benchmarks/corpora/austen.txt.xz | head -c 400000 > /tmp/austen.txt
    kd precompute --teacher ~/.cache/offline_kd/teachers/minilm-mlm-* --corpus /tmp/austen.txt \\
        --output /tmp/austen.zarr --max-length 128 --top-k 0 --device cpu
"""

from __future__ import annotations

import argparse

import torch
from _common import markdown_table


def kl_rows(ref: torch.Tensor, other: torch.Tensor, T: float) -> torch.Tensor:
    lp, lq = (ref / T).log_softmax(-1), (other / T).log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def compare(ref: torch.Tensor, other: torch.Tensor, chunk: int = 1024) -> dict:
    """KL(ref ‖ other) at T = 1, 2 (mean, max), top-1 agreement, max |Δ logit| over [N, V] logits."""
    out = {"kl1": [], "kl2": [], "top1": 0, "maxdiff": 0.0}
    for a in range(0, ref.shape[0], chunk):
        r, o = ref[a : a + chunk].float(), other[a : a + chunk].float()
        out["kl1"].append(kl_rows(r, o, 1.0))
        out["kl2"].append(kl_rows(r, o, 2.0))
        out["top1"] += int((r.argmax(-1) == o.argmax(-1)).sum())
        out["maxdiff"] = max(out["maxdiff"], float((r - o).abs().max()))
    kl1, kl2 = torch.cat(out["kl1"]), torch.cat(out["kl2"])
    return dict(
        kl1_mean=float(kl1.mean()), kl1_max=float(kl1.max()), kl2_mean=float(kl2.mean()),
        kl2_max=float(kl2.max()), top1=out["top1"] / ref.shape[0], maxdiff=out["maxdiff"],
    )  # fmt: skip


def load(store_url: str, sequences: int):
    """(the stored fp32 head, fp16 hidden [n, H] of real positions, masked ids [S, L], attention mask)."""
    from offline_kd.store.signal_store import SignalStore
    from offline_kd.teacher.head import load_head

    store = SignalStore.open(store_url)
    n = min(sequences, int(store.meta.num_sequences))
    data = store.read(0, 0, n)
    lengths = torch.from_numpy(data["lengths"].astype("int64"))
    mask = torch.arange(data["hidden"].shape[1])[None, :] < lengths[:, None]
    hidden = torch.from_numpy(data["hidden"])[mask]
    ids = torch.from_numpy(data["masked_input_ids"].astype("int64"))
    return store, load_head(store), hidden, ids, mask


@torch.no_grad()
def teacher_bf16_logits(teacher: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(teacher, dtype=torch.float32, use_kernels=False).eval()
    out = []
    for a in range(0, ids.shape[0], 16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids[a : a + 16], attention_mask=mask[a : a + 16].long()).logits
        out.append(logits.float()[mask[a : a + 16]])
    return torch.cat(out)


@torch.no_grad()
def main() -> None:
    from offline_kd.teacher.reduced_head import ReducedPrecisionHead

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--teacher", help="for the bf16 teacher row (default: the teacher the store records)")
    ap.add_argument("--sequences", type=int, default=64)
    args = ap.parse_args()
    store, head, hidden, ids, mask = load(args.store, args.sequences)
    ref = torch.cat([head(hidden[a : a + 1024].float()) for a in range(0, hidden.shape[0], 1024)])
    rows = {}
    for name, dtype in (
        ("fp16 inputs, fp32 accumulation", torch.float16),
        ("bf16 inputs, fp32 accumulation", torch.bfloat16),
    ):
        fast = ReducedPrecisionHead(head, dtype)
        got = torch.cat(
            [fast(hidden[a : a + 1024])[:, : head.vocab_size] for a in range(0, hidden.shape[0], 1024)]
        )
        rows[f"stored head, {name}"] = compare(ref, got)
    teacher = args.teacher or (store.meta.teacher or {}).get("name_or_path")
    rows["the teacher's own bf16 forward (online KD)"] = compare(ref, teacher_bf16_logits(teacher, ids, mask))
    print(
        f"{hidden.shape[0]:,} real positions of {ids.shape[0]} sequences; reference: the stored head in fp32"
    )
    print(
        f"on the stored {store.meta.hidden_dtype} hidden states (H = {hidden.shape[1]}, V = {head.vocab_size:,})\n"
    )
    table = [
        [name, f"{r['kl1_mean']:.2e}", f"{r['kl1_max']:.2e}", f"{r['kl2_mean']:.2e}", f"{r['kl2_max']:.2e}",
         f"{100 * r['top1']:.2f}%", f"{r['maxdiff']:.3g}"]
        for name, r in rows.items()
    ]  # fmt: skip
    header = [
        "against the fp32 head",
        "KL T=1 mean",
        "KL T=1 max",
        "KL T=2 mean",
        "KL T=2 max",
        "top-1 same",
        "max |Δ logit|",
    ]
    print(markdown_table(header, table))


if __name__ == "__main__":
    main()
