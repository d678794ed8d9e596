"""Lazy, rank-sharded, deterministically shuffled batches from a signal store.

Order of one epoch (a pure function of ``seed`` and ``epoch``, never of the worker count):

1. The store's chunks (``chunk_sequences`` rows each; reading one row decompresses its whole
   chunk) are permuted, and the permuted list is cut into *buffers* of ``buffer_chunks`` chunks.
2. The rows of each buffer are permuted; the concatenation of the buffers is the epoch's global
   order of sequence indices.
3. Data-parallel rank ``r`` of ``W`` takes the contiguous slice ``[r·n, (r+1)·n)`` of that order,
   ``n = S // W`` (no overlap; at most ``W - 1`` sequences are left out), so ranks read disjoint
   chunks; it cuts its slice into micro-batches and drops the last partial one.

Epoch ``e`` replays mask view ``e mod views``. The position within an epoch is the micro-batch
index, so a resumed run restarts at exactly the next unseen sample.

DataLoader workers each read whole *groups* of consecutive micro-batches (about one buffer), so
every chunk is decompressed once per group; a group is one DataLoader item, and the loader's
round-robin over workers returns the groups in order. Zarr objects are opened inside each worker
(the dataset pickles only the store URL).

Reading never draws from the global random generators: the order comes from seeded NumPy
generators and the DataLoader gets its own seeded ``torch.Generator``. So the model's random
stream (dropout) is the same whether or not a loader was created in between, which is what
makes a resumed run an exact continuation. A store error raised inside a worker comes back to
the training process as the same one-line error, not wrapped in the worker's traceback.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from offline_kd.runtime.settings import DataConfig
from offline_kd.store.hidden_dtype import BATCH_DTYPES
from offline_kd.store.hidden_dtype import to_batch as hidden_to_batch
from offline_kd.store.signal_store import (
    SPECS,
    SignalStore,
    StoreCorruptionError,
    StoreError,
    StoreMeta,
    array_specs,
    open_store,
    temperature_index,
)


@dataclass
class WorkerError:
    """A store error raised in a DataLoader worker, passed back as an item and raised again."""

    error: StoreError


def batch_fields(meta: StoreMeta, *, lse: bool, hidden: bool, topk: bool = True) -> list[str]:
    """The store arrays a training batch reads: every array the store has, except ``lse`` when no
    temperature is used, ``hidden`` when no hidden-state loss is used and the top-k arrays when the
    KL does not read them (the exact KL recomputes the teacher's logits from ``hidden``)."""
    wanted = {"lse": lse, "hidden": hidden, "topk_ids": topk, "topk_logits": topk}
    unused = {name for name, want in wanted.items() if not want}
    return [spec.name for spec in array_specs(meta) if spec.name not in unused]


class EpochOrder:
    """The deterministic order of one epoch and one rank's share of it."""

    def __init__(
        self,
        num_sequences: int,
        chunk_sequences: int,
        *,
        seed: int,
        epoch: int,
        buffer_chunks: int = DataConfig.buffer_chunks,
        world_size: int = 1,
        rank: int = 0,
        shuffle: bool = True,
    ):
        self.S = int(num_sequences)
        self.c = int(chunk_sequences)
        self.buffer_chunks = max(int(buffer_chunks), 1)
        self.seed, self.epoch = int(seed), int(epoch)
        self.shuffle = shuffle
        n_chunks = math.ceil(self.S / self.c)
        rng = np.random.default_rng([self.seed, self.epoch, 0x5EED])
        chunks = rng.permutation(n_chunks) if shuffle else np.arange(n_chunks)
        self.buffers = [chunks[i : i + self.buffer_chunks] for i in range(0, n_chunks, self.buffer_chunks)]
        sizes = [sum(min(self.c, self.S - ch * self.c) for ch in b) for b in self.buffers]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.per_rank = self.S // world_size
        self.rank_start = rank * self.per_rank
        self._cache: dict[int, np.ndarray] = {}

    def buffer_rows(self, j: int) -> np.ndarray:
        rows = self._cache.get(j)
        if rows is None:
            rows = np.concatenate(
                [
                    np.arange(ch * self.c, min((ch + 1) * self.c, self.S), dtype=np.int64)
                    for ch in self.buffers[j]
                ]
            )
            if self.shuffle:
                rows = np.random.default_rng([self.seed, self.epoch, 1 + j]).permutation(rows)
            self._cache = {j: rows}  # one buffer at a time is enough for sequential reads
        return rows

    def global_rows(self, start: int, stop: int) -> np.ndarray:
        """Sequence indices at global positions [start, stop) of the epoch order."""
        out = []
        p = start
        while p < stop:
            j = int(np.searchsorted(self.offsets, p, side="right") - 1)
            end = min(stop, int(self.offsets[j + 1]))
            rows = self.buffer_rows(j)
            out.append(rows[p - self.offsets[j] : end - self.offsets[j]])
            p = end
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def rank_rows(self, start: int, stop: int) -> np.ndarray:
        """Sequence indices at positions [start, stop) of this rank's share."""
        stop = min(stop, self.per_rank)
        return self.global_rows(self.rank_start + start, self.rank_start + stop)


@dataclass
class ReaderConfig:
    url: str
    micro_batch_size: int
    seed: int = 0
    num_workers: int = DataConfig.num_workers
    buffer_chunks: int = DataConfig.buffer_chunks
    temperature: float | None = None  # pick this column of `lse`; None: no lse
    hidden: bool = True
    topk: bool = True  # read topk_ids / topk_logits
    trim_padding: bool = True
    shuffle: bool = True
    prefetch_factor: int = 2
    storage_options: dict | None = None


def _shared_empty(shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory: a DataLoader worker hands it to the training process
    without the copy into shared memory it makes of any other tensor (torch's own collate does the same)."""
    torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    storage = torch.UntypedStorage._new_shared(max(1, math.prod(shape)) * torch_dtype.itemsize)
    return torch.empty(0, dtype=torch_dtype).set_(storage, 0, shape)


def _tensor(a: np.ndarray, dtype: type, shared: bool) -> torch.Tensor:
    """``a`` cast to ``dtype`` as a new tensor, in shared memory when ``shared`` (one copy either way)."""
    if not shared:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))
    t = _shared_empty(a.shape, np.dtype(dtype))
    np.copyto(t.numpy(), a, casting="unsafe")
    return t


class StoreBatches(IterableDataset):
    """One epoch of one rank's micro-batches, from micro-batch `start` to `stop` (exclusive).

    Each item is a list of consecutive micro-batches (a group); see the module docstring.
    """

    def __init__(
        self, cfg: ReaderConfig, meta, *, epoch: int, world_size: int, rank: int, start: int, stop: int
    ):
        super().__init__()
        self.cfg = cfg
        self.epoch = epoch
        self.view = epoch % int(meta.views)
        self.num_sequences = int(meta.num_sequences)
        self.chunk = int(meta.chunk_sequences)
        self.pad_id = int(getattr(meta, "pad_token_id", 0) or 0)
        self.hidden_dtype = str(getattr(meta, "hidden_dtype", "float16"))
        self.t_index = None
        if cfg.temperature is not None:
            try:
                self.t_index = temperature_index(meta.temperatures, cfg.temperature)
            except KeyError:
                temps = [float(t) for t in meta.temperatures]
                raise ValueError(
                    f"temperature {cfg.temperature} is not stored (store has {temps}); pick one of them "
                    "or use --no-kl-tail"
                ) from None
        self.world_size, self.rank = world_size, rank
        self.start, self.stop = start, stop
        self.group = max(1, (cfg.buffer_chunks * self.chunk) // cfg.micro_batch_size)
        self.fields = batch_fields(meta, lse=self.t_index is not None, hidden=cfg.hidden, topk=cfg.topk)
        self._store = None
        self._pid = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_store"] = None  # never pickle zarr handles; each worker opens its own
        state["_pid"] = None
        return state

    def use_store(self, store) -> None:
        """Read through `store` (`cfg.url`, already open) in this process."""
        self._store, self._pid = store, os.getpid()

    @property
    def store(self):
        if self._store is None or self._pid != os.getpid():
            self._store = open_store(self.cfg.url, self.cfg.storage_options)
            self._pid = os.getpid()
        return self._store

    def order(self) -> EpochOrder:
        return EpochOrder(
            self.num_sequences,
            self.chunk,
            seed=self.cfg.seed,
            epoch=self.epoch,
            buffer_chunks=self.cfg.buffer_chunks,
            world_size=self.world_size,
            rank=self.rank,
            shuffle=self.cfg.shuffle,
        )

    def groups(self) -> list[tuple[int, int]]:
        return [(g, min(g + self.group, self.stop)) for g in range(self.start, self.stop, self.group)]

    def _layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Each field's row shape and dtype, as stored (an old store's included)."""
        arrays = {f: self.store.array(f) for f in self.fields}
        return {f: (a.shape[2 if SPECS[f].per_view else 1 :], a.dtype) for f, a in arrays.items()}

    def read_rows(self, rows: np.ndarray, out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Read the given sequences (any order) by whole contiguous chunk runs; rows in given order
        (into ``out`` when given, arrays of ``len(rows)`` rows)."""
        chunks = np.unique(rows // self.chunk)
        runs = []
        run_start = prev = int(chunks[0])
        for ch in chunks[1:]:
            ch = int(ch)
            if ch != prev + 1:
                runs.append((run_start, prev + 1))
                run_start = ch
            prev = ch
        runs.append((run_start, prev + 1))
        store = self.store
        if out is None:
            out = {
                f: np.empty((len(rows), *shape), dtype=dtype) for f, (shape, dtype) in self._layout().items()
            }
        for a, b in runs:
            lo, hi = a * self.chunk, min(b * self.chunk, self.num_sequences)
            used = np.flatnonzero((rows >= lo) & (rows < hi))  # the positions this run fills
            if len(used) == hi - lo:  # every row of the run is used: decoded straight into place
                positions = np.empty_like(used)
                positions[rows[used] - lo] = used
                store.read_into(self.view, lo, hi, out, positions)
                continue
            part = store.read(self.view, lo, hi, fields=self.fields)
            for f, v in part.items():
                out[f][used] = v[rows[used] - lo]
        return out

    def collate(
        self, d: dict[str, np.ndarray], rows: np.ndarray, owners: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """One micro-batch. ``owners``: in a DataLoader worker, the shared-memory tensors ``d`` views,
        from which the batch is built so that handing it over copies nothing more."""
        shared = owners is not None
        lengths = d["lengths"].astype(np.int64)
        full = d["input_ids"].shape[1]
        L = max(int(lengths.max()) if self.cfg.trim_padding else full, 1)
        mlm_mask = _tensor(d["mlm_mask"][:, :L], np.bool_, shared)
        input_ids = torch.from_numpy(d["input_ids"][:, :L].astype(np.int64))
        out = {
            "input_ids": _tensor(d["masked_input_ids"][:, :L], np.int64, shared),
            "attention_mask": (torch.arange(L)[None, :] < torch.from_numpy(lengths)[:, None]).long(),
            "mlm_mask": mlm_mask,
            "labels": torch.where(mlm_mask, input_ids, torch.full_like(input_ids, -100)),
            "rows": torch.from_numpy(rows.astype(np.int64)),
        }
        if "topk_ids" in d:  # not read for the exact KL, absent in a --top-k 0 store
            out["topk_ids"] = _tensor(d["topk_ids"][:, :L], np.int64, shared)
            if shared and L == full:  # the shared rows themselves: contiguous, no copy
                out["topk_logits"] = owners["topk_logits"]
            else:
                out["topk_logits"] = _tensor(d["topk_logits"][:, :L], np.float32, shared)
        if self.t_index is not None:
            out["lse"] = _tensor(d["lse"][:, :L, self.t_index], np.float32, shared)
        if "hidden" in d:
            if shared and L == full and self.hidden_dtype in ("float16", "bfloat16"):
                out["hidden"] = owners["hidden"].view(BATCH_DTYPES[self.hidden_dtype])
            else:
                out["hidden"] = hidden_to_batch(d["hidden"][:, :L], self.hidden_dtype)
        return out

    def load_group(self, g0: int, g1: int) -> list[dict[str, torch.Tensor]]:
        B = self.cfg.micro_batch_size
        order = self.order()
        rows = order.rank_rows(g0 * B, g1 * B)
        owners = None
        if get_worker_info() is not None:  # read straight into memory the training process maps
            owners = {
                f: _shared_empty((len(rows), *shape), dtype) for f, (shape, dtype) in self._layout().items()
            }
        data = self.read_rows(rows, None if owners is None else {f: t.numpy() for f, t in owners.items()})
        out = []
        for m in range(g1 - g0):
            sl = slice(m * B, (m + 1) * B)
            mine = None if owners is None else {f: t[sl] for f, t in owners.items()}
            out.append(self.collate({f: v[sl] for f, v in data.items()}, rows[sl], mine))
        return out

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]] | WorkerError]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, (g0, g1) in enumerate(self.groups()):
            if i % nw == wid:
                try:
                    yield self.load_group(g0, g1)
                except (StoreError, StoreCorruptionError) as e:
                    if info is None:
                        raise
                    # The loader would re-raise it wrapped in the worker's whole traceback.
                    yield WorkerError(type(e)(str(e)))
                    return


class StoreReader:
    """Micro-batches for one rank across epochs, resumable at (epoch, micro-batch index)."""

    batches_type: type[StoreBatches] = StoreBatches  # what `dataset` builds (a benchmark times a subclass)

    def __init__(
        self, cfg: ReaderConfig, *, world_size: int = 1, rank: int = 0, store: SignalStore | None = None
    ):
        """`store`: `cfg.url` already opened (training opens it once, to check it); reader processes
        open their own."""
        self.cfg = cfg
        self.world_size, self.rank = world_size, rank
        self.store = store if store is not None else open_store(cfg.url, cfg.storage_options)
        self.meta = self.store.meta
        if cfg.hidden and not self.meta.hidden:
            raise ValueError(
                "the store has no hidden states (precompute with --hidden) but the cosine loss needs them"
            )
        if cfg.temperature is not None and self.meta.top_k == 0:
            raise ValueError(
                "the store has no top-k signals or log-sum-exps (precomputed with --top-k 0): "
                "train with --kl-source exact"
            )
        self.per_rank = int(self.meta.num_sequences) // world_size
        self.micro_per_epoch = self.per_rank // cfg.micro_batch_size
        if self.micro_per_epoch == 0:
            raise ValueError(
                f"the store has {self.meta.num_sequences} sequences: fewer than one micro-batch of "
                f"{cfg.micro_batch_size} per rank across {world_size} ranks"
            )

    def dataset(self, epoch: int, start: int = 0, stop: int | None = None) -> StoreBatches:
        stop = self.micro_per_epoch if stop is None else min(stop, self.micro_per_epoch)
        batches = self.batches_type(
            self.cfg,
            self.meta,
            epoch=epoch,
            world_size=self.world_size,
            rank=self.rank,
            start=start,
            stop=stop,
        )
        batches.use_store(self.store)  # reader processes drop it when pickled and open their own
        return batches

    def epoch_batches(
        self, epoch: int, start: int = 0, stop: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches [start, stop) of `epoch` for this rank, prefetched by DataLoader workers."""
        ds = self.dataset(epoch, start, stop)
        if ds.start >= ds.stop:
            return
        kwargs = {}
        if self.cfg.num_workers > 0:
            kwargs = dict(prefetch_factor=self.cfg.prefetch_factor, multiprocessing_context="spawn")
        # Its own generator: creating the loader's iterator draws a seed, never from the global RNG.
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.cfg.seed, epoch, self.rank, start]).generate_state(1)[0])
        )
        # Pinned host memory on a CUDA host: the trainer's copies to the device then do not block the host.
        loader = DataLoader(
            ds, batch_size=None, num_workers=self.cfg.num_workers, generator=generator,
            pin_memory=torch.cuda.is_available(), **kwargs,
        )  # fmt: skip
        for group in loader:
            if isinstance(group, WorkerError):
                raise group.error
            yield from group
