"""`kd verify --exact`: the logits recovered from the stored hidden states through the stored head,
compared with the stored top-k logits and log-sum-exps.

For each sampled sequence (real positions only): top-1 agreement (the recovered arg-max is the stored
first id), top-k agreement (overlap of the recovered top-k with the stored ids), the largest error of
a recovered logit at a stored id, of a recovered log-sum-exp, and the mean KL between the stored and
the recovered distributions over the same K + 1 outcomes (the K stored ids and the tail), at every
stored temperature. A sequence fails beyond :data:`MAX_KL` or :data:`MAX_LOGIT_ERROR` (see
docs/store-format.md, "Inspect and verify").
"""

from __future__ import annotations

import numpy as np
import torch

from offline_kd.store.hidden_dtype import decode
from offline_kd.store.signal_store import SignalStore

# A sequence fails when its mean KL(stored ‖ recovered) at any stored T exceeds MAX_KL (nats), or a
# recovered logit or log-sum-exp is further than MAX_LOGIT_ERROR · max(1, |largest stored logit|)
# from the stored one. Measured on good stores (docs/results.md, "Store layouts"), the worst sequence
# reaches KL 2.1e-4 and a relative error of 0.014 (float8 hidden states, bf16 teacher pass): margins
# of 47× and 7×. A swapped head or drifted hidden states are off by nats.
MAX_KL = 1e-2
MAX_LOGIT_ERROR = 0.1


def sample_sequences(num_sequences: int, sample: int) -> np.ndarray:
    """The sequences ``kd verify`` reruns or recomputes (the same for --teacher and --exact)."""
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(num_sequences, size=min(sample, num_sequences), replace=False))


def _kl_topk_tail(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row over K ids + the tail, from the K log-probabilities of each (float64)."""
    p, q = p_logp.exp(), q_logp.exp()
    p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_tail = (1.0 - q.sum(-1)).clamp_min(1e-300)
    head = (p * (p_logp - q_logp)).sum(-1)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log() - q_tail.log()), 0.0)
    return head + tail


@torch.no_grad()
def compare_sequence(head: torch.nn.Module, d: dict, hidden_dtype: str, temperatures: list[float]) -> dict:
    """Figures for one stored sequence ``d`` (``read`` of one row: lengths, hidden, topk_*, lse)."""
    n = int(d["lengths"][0])
    device = next(head.parameters()).device
    h = decode(d["hidden"][0, :n], hidden_dtype).to(device=device, dtype=torch.float32)
    z = head(h).double().cpu()  # [n, V]
    ids = torch.from_numpy(d["topk_ids"][0, :n].astype(np.int64))
    stored = torch.from_numpy(d["topk_logits"][0, :n]).double()
    lse = torch.from_numpy(d["lse"][0, :n]).double()
    at_ids = z.gather(1, ids)
    k = ids.shape[1]
    overlap = (z.topk(k, dim=-1).indices.unsqueeze(-1) == ids.unsqueeze(-2)).any(-1).double().mean(-1)
    out = {
        "positions": n,
        "top1": int((z.argmax(-1) == ids[:, 0]).sum()),
        "topk": float(overlap.sum()),
        "max_logit_error": float((at_ids - stored).abs().max()) if n else 0.0,
        "max_lse_error": 0.0,
        "scale": max(1.0, float(stored.abs().max()) if n else 1.0),
        "kl": {},
    }
    for t, T in enumerate(temperatures):
        rec_lse = torch.logsumexp(z / T, dim=-1)
        out["max_lse_error"] = max(
            out["max_lse_error"], float((rec_lse - lse[:, t]).abs().max()) if n else 0.0
        )
        kl = _kl_topk_tail(stored / T - lse[:, t : t + 1], at_ids / T - rec_lse[:, None])
        out["kl"][float(T)] = float(kl.mean()) if n else 0.0
    return out


def exact_check(
    s: SignalStore, head: torch.nn.Module, seqs: np.ndarray, max_kl: float = MAX_KL
) -> tuple[dict, list[str]]:
    """Recompute the sampled sequences ``seqs`` (view ``i mod views``); (summary, errors naming
    each sequence beyond the tolerance)."""
    m = s.meta
    errors: list[str] = []
    tot = {"sequences": len(seqs), "positions": 0, "top1": 0, "topk": 0.0}
    worst = {
        "max_logit_error": 0.0,
        "max_lse_error": 0.0,
        "worst_relative_error": 0.0,
        "worst_sequence_kl": 0.0,
    }
    kl_sum = {float(T): 0.0 for T in m.temperatures}
    fields = ["lengths", "hidden", "topk_ids", "topk_logits", "lse"]
    for i in seqs:
        view = int(i) % m.views
        f = compare_sequence(
            head, s.read(view, int(i), int(i) + 1, fields=fields), m.hidden_dtype, m.temperatures
        )
        tot["positions"] += f["positions"]
        tot["top1"] += f["top1"]
        tot["topk"] += f["topk"]
        err = max(f["max_logit_error"], f["max_lse_error"]) / f["scale"]
        f.update(worst_relative_error=err, worst_sequence_kl=max(f["kl"].values(), default=0.0))
        for key in worst:
            worst[key] = max(worst[key], f[key])
        for T, v in f["kl"].items():
            kl_sum[T] += v * f["positions"]
        bad_kl = {T: v for T, v in f["kl"].items() if not v <= max_kl}
        if bad_kl or not err <= MAX_LOGIT_ERROR:
            T, v = max(f["kl"].items(), key=lambda kv: kv[1])
            errors.append(
                f"view {view}, sequence {int(i)}: logits recovered through the stored head differ from the "
                f"stored ones (mean KL {v:.3g} at T={T:g}, max logit error {err * f['scale']:.3g}; "
                f"tolerance KL {max_kl:g}, logit error {MAX_LOGIT_ERROR:g}·max(1, |logit|))"
            )
    n = max(tot["positions"], 1)
    summary = {
        "sequences": tot["sequences"],
        "positions": tot["positions"],
        "top1_agreement": tot["top1"] / n,
        "topk_agreement": tot["topk"] / n,
        **worst,
        "mean_kl": {str(T): v / n for T, v in kl_sum.items()},
        "tolerance": {"kl": max_kl, "logit_error_relative": MAX_LOGIT_ERROR},
    }
    return summary, errors


def format_exact(summary: dict) -> str:
    """One line of ``kd verify --exact`` figures."""
    kl = ", ".join(f"T={float(T):g} {v:.3g}" for T, v in summary["mean_kl"].items())
    return (
        f"exact: {summary['sequences']} sequence(s), {summary['positions']} positions: top-1 agreement "
        f"{summary['top1_agreement']:.4f}, top-k agreement {summary['topk_agreement']:.4f}, max logit error "
        f"{summary['max_logit_error']:.3g}, max lse error {summary['max_lse_error']:.3g}, mean KL {kl}"
    )
