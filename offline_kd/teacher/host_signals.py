"""One view's teacher signals on the host, filled batch by batch while the teacher runs.

On CPU each batch is checked for NaN/inf at once and written into buffers in the stored dtypes (the
store's schema says which). On CUDA each batch goes into pinned host buffers by non-blocking copies on
a side stream, so the copies overlap the next batch's forward and the host never waits on the GPU;
:meth:`HostSignals.result` (called by the store writer) waits on the last copy's event, checks for
NaN/inf, and only then hands the arrays over, in the stored dtypes.
"""

from __future__ import annotations

import numpy as np
import torch

from offline_kd.store import hidden_dtype as hd
from offline_kd.store.signal_store import StoreMeta, array_specs
from offline_kd.teacher.model import DeviceSignals, check_finite


class HostSignals:
    def __init__(self, meta: StoreMeta, n: int, device: str | torch.device) -> None:
        """Buffers for the teacher's arrays of ``n`` sequences of one view, computed on ``device``."""
        self.specs = [spec for spec in array_specs(meta, per_view=True) if spec.source == "teacher"]
        self.meta, self.n = meta, n
        device = torch.device(device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.event: torch.cuda.Event | None = None
        # CPU: numpy buffers in the stored dtypes; CUDA: pinned buffers in the device's dtypes (on first use)
        self.host: dict = {} if self.stream else {spec.name: spec.empty(meta, n) for spec in self.specs}

    def put(self, start: int, sig: DeviceSignals, seq_offset: int) -> None:
        """Store the signals of sequences [start, start + batch); ``seq_offset`` + start names the first."""
        if self.stream is None:
            check_finite(sig.nonfinite, seq_offset + start)
            for spec in self.specs:
                self.host[spec.name][start : start + len(sig.nonfinite)] = self._stored(
                    spec, getattr(sig, spec.name)
                )
            return
        src = {spec.name: getattr(sig, spec.name) for spec in self.specs}
        src["nonfinite"] = sig.nonfinite
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            for name, t in src.items():
                if name not in self.host:
                    self.host[name] = torch.empty((self.n, *t.shape[1:]), dtype=t.dtype, pin_memory=True)
                self.host[name][start : start + len(t)].copy_(t, non_blocking=True)
                t.record_stream(self.stream)  # the allocator must not reuse t before the copy ran
            self.event = torch.cuda.Event()
            self.event.record(self.stream)

    def result(self, seq_offset: int) -> dict[str, np.ndarray]:
        """The arrays in their stored dtypes, once the copies are done; raises TeacherError naming the
        first sequence (``seq_offset`` + row) with a NaN/inf logit."""
        if self.stream is None:
            return self.host
        if self.event is not None:
            self.event.synchronize()
        check_finite(self.host["nonfinite"].numpy(), seq_offset)
        return {spec.name: self._stored(spec, self.host[spec.name]) for spec in self.specs}

    def _stored(self, spec, t: torch.Tensor) -> np.ndarray:
        """A host tensor as its stored numpy array (hidden states as their stored dtype's bits)."""
        if spec.name == "hidden":
            return hd.encode(t, self.meta.hidden_dtype)
        return t.numpy().astype(spec.dtype_for(self.meta), copy=False)
