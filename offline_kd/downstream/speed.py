"""Size and speed, measured: parameters, weights on disk, CPU latency at batch 1, GPU throughput.

DistilBERT's protocol for latency: the encoder on the CPU, one example at a time (batch 1), over the
same eval inputs for every model. The models take turns example by example, so that a change in the
machine's load falls on all of them alike. Weights on disk: the encoder saved as safetensors, so a
student and its teacher are weighed the same way whatever files their directories hold. On CUDA, the
throughput at a large batch (`throughput_batch` examples of `max_length` tokens, bf16 autocast).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from offline_kd.runtime.hub_kernels import load_kwargs


@dataclass
class SizeSpeed:
    parameters: int
    disk_bytes: int
    cpu_latency_ms: float  # median over the timed examples, batch 1
    cpu_seconds_total: float  # the sum over the timed examples
    gpu_throughput: float | None = None  # examples per second at the large batch; None without CUDA

    def as_dict(self) -> dict:
        return asdict(self)


def load_encoder(path: str, hub_kernels: bool = False):
    """The bare encoder (`AutoModel`) of a checkpoint, in eval mode."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a masked LM's head weights are "unused" here, as intended
    try:
        return AutoModel.from_pretrained(path, **load_kwargs(hub_kernels)).eval()
    finally:
        hf_logging.set_verbosity(level)


def disk_bytes(model) -> int:
    """Bytes of the model's weights saved as safetensors."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))


def gpu_throughput(model, tokenizer, batch: int, max_length: int, repeats: int = 10) -> float | None:
    """Examples per second on CUDA at `batch` × `max_length` under bf16 autocast; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    model = model.cuda()
    ids = torch.randint(1000, min(tokenizer.vocab_size, 30000), (batch, max_length), device="cuda")
    mask = torch.ones_like(ids)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids, attention_mask=mask)
        torch.cuda.synchronize()
    model.cpu()
    return batch * repeats / (time.perf_counter() - t0)


def measure(paths: dict[str, str], tokenizers: dict[str, object], texts: list[tuple[str, ...]],
            max_length: int = 128, throughput_batch: int = 256, hub_kernels: bool = False) -> dict[str, SizeSpeed]:  # fmt: skip
    """Size and speed of every model on the same inputs, in one run."""
    models = {n: load_encoder(p, hub_kernels) for n, p in paths.items()}
    inputs = {
        n: [tokenizers[n](*t, truncation=True, max_length=max_length, return_tensors="pt") for t in texts]
        for n in models
    }
    times = _latencies_per_tokenizer(models, inputs)
    out = {}
    for name, model in models.items():
        out[name] = SizeSpeed(
            parameters=sum(p.numel() for p in model.parameters()),
            disk_bytes=disk_bytes(model),
            cpu_latency_ms=1000 * statistics.median(times[name]) if times[name] else float("nan"),
            cpu_seconds_total=round(sum(times[name]), 4),
            gpu_throughput=gpu_throughput(model, tokenizers[name], throughput_batch, max_length),
        )
    return out


def _latencies_per_tokenizer(models: dict, inputs: dict, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per example at batch 1, every model reading its own tokenization of the same texts; the
    models take turns example by example (after `warmup` untimed examples)."""
    import torch

    n = min(len(v) for v in inputs.values())
    order = [(i, False) for i in range(min(warmup, n))] + [(i, True) for i in range(n)]
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for i, timed in order:
            for name, model in models.items():
                t0 = time.perf_counter()
                model(**inputs[name][i])
                if timed:
                    times[name].append(time.perf_counter() - t0)
    return times


def ratios(results: dict[str, SizeSpeed], teacher: str) -> dict[str, dict[str, float | None]]:
    """Each model against the teacher: parameter and disk fractions, CPU and GPU speed-ups."""
    t = results[teacher]
    out = {}
    for name, r in results.items():
        out[name] = {
            "parameters": r.parameters / t.parameters,
            "disk": r.disk_bytes / t.disk_bytes,
            "cpu_speedup": t.cpu_latency_ms / r.cpu_latency_ms if r.cpu_latency_ms else None,
            "gpu_speedup": (r.gpu_throughput / t.gpu_throughput)
            if r.gpu_throughput and t.gpu_throughput
            else None,
        }
    return out
