"""What the benchmark scripts share: corpus paths, teachers, timing, memory probes and the markdown table.

The scripts run as `python benchmarks/NAME.py`, so this folder is first on `sys.path` and they
import this module as `_common`. torch is imported inside the functions: `loss_kernels.py` sets up the
allocator before torch loads.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Real text for the fidelity benchmark (Austen, KJV), kept beside the repository, not in it.
SHARED_CORPORA = REPO.parent / "shared" / "corpora"


def write_corpus_head(dest: Path, n_lines: int, source: Path | None = None) -> Path:
    """The first `n_lines` documents of `source` (default: the embedded sample corpus), written to `dest`."""
    if source is None:
        from offline_kd.examples.demo import sample_corpus

        source = sample_corpus()
    lines = Path(source).read_text(encoding="utf-8").splitlines()[:n_lines]
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def minilm_teacher(out_dir: Path) -> Path:
    """The pip-shipped MiniLM-L6-H384 encoder (vocabulary 30,522) as a BertForMaskedLM, saved with its tokenizer.

    The MLM head is freshly initialised (no timing depends on its values); dropout is off.
    """
    from transformers import AutoTokenizer, BertForMaskedLM
    from transformers.utils import logging as hf_logging

    from offline_kd.examples.minilm import minilm_encoder_dir

    enc = minilm_encoder_dir()
    hf_logging.set_verbosity_error()  # the new head's "MISSING" report is expected here
    model = BertForMaskedLM.from_pretrained(enc, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(enc).save_pretrained(out_dir)
    return out_dir


def tiny_teacher(out_dir: Path, hidden: int = 64, layers: int = 4) -> Path:
    """A tiny BERT teacher (offline_kd.examples.tiny) whose vocabulary is trained on 200 pseudo-English documents."""
    from offline_kd.examples.tiny import build_tiny_teacher, make_documents

    return build_tiny_teacher(out_dir, make_documents(200), hidden=hidden, layers=layers)


TEACHERS = {
    "minilm-random-head": "MiniLM-L6-H384 (vocab 30,522) + a random MLM head (for timing only)",
    "minilm-fitted": "MiniLM-L6-H384 + an MLM head fitted on the corpus (a quick fit)",
    "bert-base-random": "bert-base shape (H = 768, 12 layers), random weights",
    "tiny": "tiny BERT (hidden 64, 4 layers)",
}


def build_teacher(kind: str, tmp: Path, corpus: Path | None = None) -> tuple[str, str]:
    """(directory, description) of a benchmark teacher: one of `TEACHERS`, else `kind` is a directory."""
    if kind == "minilm-random-head":
        return str(minilm_teacher(tmp / kind)), TEACHERS[kind]
    if kind == "minilm-fitted":
        import sys

        from offline_kd.examples.demo import sample_corpus
        from offline_kd.examples.minilm import MiniLMFitConfig, fit_minilm_teacher

        cfg = MiniLMFitConfig(corpus=[str(corpus or sample_corpus())], head_steps=20, steps=60, batch_size=16)
        return str(fit_minilm_teacher(cfg, log=lambda m: print(m, file=sys.stderr))), TEACHERS[kind]
    if kind == "bert-base-random":
        import torch
        from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

        from offline_kd.examples.minilm import minilm_encoder_dir

        torch.manual_seed(0)
        BertForMaskedLM(BertConfig()).save_pretrained(tmp / kind)
        AutoTokenizer.from_pretrained(minilm_encoder_dir()).save_pretrained(tmp / kind)
        return str(tmp / kind), TEACHERS[kind]
    if kind == "tiny":
        return str(tiny_teacher(tmp / kind, hidden=64, layers=4)), TEACHERS[kind]
    return kind, kind


def sync(device) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device) -> float:
    """Seconds one call of `fn` takes on `device`, its queued GPU work included."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device) -> dict[str, float]:
    """Median seconds of each function: one warm-up call each, then `repeats` rounds timed round-robin.

    Interleaving lets background load on a shared machine hit every variant alike.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def mmap_large_blocks() -> None:
    """Tell glibc to serve blocks of 64 KiB and more by mmap and give them back on free, so RSS follows live memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
    except OSError:  # pragma: no cover - not glibc
        pass


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def memory_probe(device) -> tuple[Callable[[], None], Callable[[], int]]:
    """(reset, peak): `peak()` is the most memory in bytes allocated above what was live at `reset()`.

    CUDA: the allocator's peak statistics. CPU: the RSS high-water mark, reset through
    /proc/self/clear_refs (call `mmap_large_blocks` first, so freed tensors leave the RSS).
    """
    import torch

    base = [0]
    if torch.device(device).type == "cuda":

        def reset() -> None:
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base[0] = torch.cuda.memory_allocated()

        def peak() -> int:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base[0]

        return reset, peak

    def reset() -> None:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current RSS
        except OSError:  # pragma: no cover
            pass
        base[0] = _status_bytes("VmRSS")

    return reset, lambda: _status_bytes("VmHWM") - base[0]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table; a row may carry cells beyond the header (a trailing note)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
