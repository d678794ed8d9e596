"""The signal store: a Zarr v3 group with sharded, crc32c-checked arrays (see docs/store-format.md)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import zarr
import zarr.codecs as zc

FORMAT = "offline_kd.signal_store"
FORMAT_VERSION = 1
ATTR_KEY = "offline_kd"

INPUT_FIELDS = ("input_ids", "lengths")
VIEW_FIELDS = ("masked_input_ids", "mlm_mask", "topk_ids", "topk_logits", "lse", "hidden")
ALL_FIELDS = INPUT_FIELDS + VIEW_FIELDS
# Keys that may differ between runs writing the same store (not settings).
IGNORED_KEYS = ("package_version", "corpus.sources", "corpus.holdout.file", "teacher.name_or_path")


class StoreError(RuntimeError):
    """A store cannot be created, opened or written as asked."""


class StoreMismatchError(StoreError):
    """An existing store was made with different settings."""


class StoreCorruptionError(StoreError):
    """A chunk failed its checksum or could not be decoded."""


@dataclass
class StoreMeta:
    """The root attributes (``g.attrs["offline_kd"]``) as a dataclass."""

    num_sequences: int
    max_length: int
    top_k: int
    views: int
    temperatures: list[float]
    hidden: bool
    hidden_size: int
    vocab_size: int
    tokenizer_sha256: str
    pad_token_id: int
    teacher: dict
    tokenizer: dict
    masking: dict
    seed: int
    corpus: dict
    shard_sequences: int
    chunk_sequences: int
    num_shards: int
    dtypes: dict
    compression: dict = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    package_version: str = ""

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> StoreMeta:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def id_dtype(self) -> str:
        return self.dtypes["ids"]


def id_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "int32"


def shard_range(meta: StoreMeta, shard: int) -> tuple[int, int]:
    a = shard * meta.shard_sequences
    return a, min(a + meta.shard_sequences, meta.num_sequences)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def diff_meta(a: dict, b: dict) -> list[str]:
    """Dotted keys whose values differ between two attribute dicts (ignoring non-settings)."""
    fa, fb = _flatten(a), _flatten(b)
    keys = sorted(set(fa) | set(fb))
    return [
        k
        for k in keys
        if not any(k == i or k.startswith(i + ".") for i in IGNORED_KEYS) and fa.get(k) != fb.get(k)
    ]


def _array_specs(meta: StoreMeta) -> dict[str, tuple[tuple, str, tuple, tuple]]:
    S, L, V, K, nT = meta.num_sequences, meta.max_length, meta.views, meta.top_k, len(meta.temperatures)
    c, R = meta.chunk_sequences, meta.shard_sequences
    ids = meta.id_dtype
    specs = {
        "input_ids": ((S, L), ids, (c, L), (R, L)),
        "lengths": ((S,), "int32", (c,), (R,)),
        "masked_input_ids": ((V, S, L), ids, (1, c, L), (1, R, L)),
        "mlm_mask": ((V, S, L), "bool", (1, c, L), (1, R, L)),
        "topk_ids": ((V, S, L, K), ids, (1, c, L, K), (1, R, L, K)),
        "topk_logits": ((V, S, L, K), "float32", (1, c, L, K), (1, R, L, K)),
        "lse": ((V, S, L, nT), "float32", (1, c, L, nT), (1, R, L, nT)),
    }
    if meta.hidden:
        H = meta.hidden_size
        specs["hidden"] = ((V, S, L, H), "float16", (1, c, L, H), (1, R, L, H))
    return specs


def _open_group(url: str, mode: str, storage_options: dict | None):
    if str(url).startswith("file://") and not storage_options:
        url = str(url)[len("file://") :]  # local store: atomic writes, no fsspec needed
    kwargs = {"storage_options": storage_options} if storage_options else {}
    return zarr.open_group(str(url), mode=mode, zarr_format=3, **kwargs)


class SignalStore:
    """Reader (and writer, for precompute) of a signal store."""

    def __init__(self, group, meta: StoreMeta, url: str):
        self.group = group
        self.meta = meta
        self.url = url
        self._arrays: dict = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, url: str, mode: str = "r", storage_options: dict | None = None) -> SignalStore:
        if mode not in ("r", "r+"):
            raise ValueError("SignalStore.open mode must be 'r' or 'r+' (use SignalStore.create to make one)")
        try:
            g = _open_group(url, mode, storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise StoreError(f"no signal store at {url!r}") from e
        attrs = g.attrs.asdict()
        if ATTR_KEY not in attrs:
            raise StoreError(f"{url!r} is not a finished signal store (no {ATTR_KEY!r} attributes)")
        d = attrs[ATTR_KEY]
        if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{url!r}: unsupported format {d.get('format')!r} version {d.get('format_version')!r} "
                f"(this reader handles {FORMAT!r} version {FORMAT_VERSION})"
            )
        return cls(g, StoreMeta.from_dict(d), str(url))

    @classmethod
    def create(
        cls,
        url: str,
        meta: StoreMeta,
        storage_options: dict | None = None,
        overwrite: bool = False,
    ) -> SignalStore:
        """Create the store, or open an existing one made with identical settings (resume).

        Arrays are created first and the root attributes written last, so a store whose
        attributes exist has all its arrays. A store with different settings is refused with
        :class:`StoreMismatchError` listing the differing keys, unless ``overwrite``.
        """
        if not meta.compression:
            meta.compression = {"codec": "zstd", "level": 1, "checksum": "crc32c"}
        compression_level = int(meta.compression.get("level", 1))
        want = meta.as_dict()
        if not overwrite:
            try:
                g = _open_group(url, "r+", storage_options)
            except (FileNotFoundError, zarr.errors.GroupNotFoundError):
                g = None
            if g is not None:
                have = g.attrs.asdict().get(ATTR_KEY)
                if have is not None:
                    diff = diff_meta(have, want)
                    if diff:
                        details = "; ".join(
                            f"{k}: store={_get(have, k)!r} requested={_get(want, k)!r}" for k in diff
                        )
                        raise StoreMismatchError(
                            f"{url!r} was made with different settings ({details}); "
                            "use a new output path or overwrite=True (--overwrite)"
                        )
                    return cls(g, StoreMeta.from_dict(have), str(url))
                # No attributes: a creation that crashed (attributes come last) may be redone;
                # anything else is not ours to delete.
                ours = set(ALL_FIELDS) | {"committed"}
                if g.attrs.asdict() or not set(g.keys()) <= ours:
                    raise StoreError(
                        f"{url!r} exists but is not a signal store; pass overwrite to replace it"
                    )
        g = _open_group(url, "w", storage_options)
        for name, (shape, dtype, chunks, shards) in _array_specs(meta).items():
            g.create_array(
                name,
                shape=shape,
                dtype=dtype,
                chunks=chunks,
                shards=shards,
                serializer=zc.BytesCodec(),
                compressors=[zc.ZstdCodec(level=compression_level), zc.Crc32cCodec()],
                fill_value=False if dtype == "bool" else 0,
            )
        g.create_array(
            "committed",
            shape=(meta.num_shards,),
            dtype="uint8",
            chunks=(1,),
            serializer=zc.BytesCodec(),
            compressors=[zc.Crc32cCodec()],
            fill_value=0,
        )
        g.attrs[ATTR_KEY] = want
        return cls(g, StoreMeta.from_dict(want), str(url))

    # ------------------------------------------------------------------ reading
    def array(self, name: str):
        if name not in self._arrays:
            if name == "hidden" and not self.meta.hidden:
                raise KeyError(f"{self.url!r} has no hidden states (precomputed without --hidden)")
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for f in ALL_FIELDS if f != "hidden" or self.meta.hidden)

    def committed(self) -> np.ndarray:
        return self._get("committed", (slice(None),), 0, self.meta.num_shards, None).astype(bool)

    def is_complete(self) -> bool:
        return bool(self.committed().all())

    def temperature_index(self, T: float) -> int:
        for i, t in enumerate(self.meta.temperatures):
            if math.isclose(float(t), float(T), rel_tol=1e-6, abs_tol=1e-9):
                return i
        raise KeyError(f"temperature {T} was not stored in {self.url!r}; stored: {self.meta.temperatures}")

    def read(
        self, view: int, start: int, stop: int, fields: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Sequences ``[start, stop)`` of ``view``; see the class docs for the keys."""
        if not 0 <= view < self.meta.views:
            raise IndexError(f"view {view} out of range: the store has {self.meta.views} views")
        if not 0 <= start <= stop <= self.meta.num_sequences:
            raise IndexError(f"range [{start}, {stop}) outside [0, {self.meta.num_sequences})")
        want = self.fields if fields is None else tuple(fields)
        out = {}
        for name in want:
            if name not in ALL_FIELDS:
                raise KeyError(f"unknown field {name!r}; known: {ALL_FIELDS}")
            sel = (slice(start, stop),) if name in INPUT_FIELDS else (view, slice(start, stop))
            out[name] = self._get(name, sel, start, stop, view if name in VIEW_FIELDS else None)
        return out

    def _get(self, name: str, sel: tuple, start: int, stop: int, view: int | None):
        arr = self.array(name)
        try:
            return arr[sel]
        except Exception as e:  # noqa: BLE001 - decode/checksum errors surface as various types
            if isinstance(e, (IndexError, KeyError, TypeError)):
                raise
            raise self._locate_corruption(name, start, stop, view, e) from e

    def _locate_corruption(self, name: str, start: int, stop: int, view: int | None, err: Exception):
        arr = self.array(name)
        c = arr.chunks[0] if arr.ndim == 1 or name in INPUT_FIELDS else arr.chunks[1]
        if name == "committed":
            c = 1
        for a in range((start // c) * c, stop, c):
            b = min(a + c, arr.shape[0] if name in INPUT_FIELDS + ("committed",) else arr.shape[1])
            sel = (slice(a, b),) if view is None else (view, slice(a, b))
            try:
                arr[sel]
            except Exception as e2:  # noqa: BLE001
                shard = a // (self.meta.shard_sequences if name != "committed" else 1)
                v = "" if view is None else f" view {view},"
                return StoreCorruptionError(
                    f"{self.url!r}: array {name!r}{v} chunk of sequences [{a}, {b}) (shard {shard}) "
                    f"is corrupt: {e2}"
                )
        v = "" if view is None else f" view {view},"
        return StoreCorruptionError(
            f"{self.url!r}: array {name!r}{v} sequences [{start}, {stop}) is corrupt: {err}"
        )

    # ------------------------------------------------------------------ writing
    def write_inputs(self, shard: int, input_ids: np.ndarray, lengths: np.ndarray) -> None:
        a, b = shard_range(self.meta, shard)
        self.array("input_ids")[a:b] = input_ids.astype(self.meta.id_dtype, copy=False)
        self.array("lengths")[a:b] = lengths.astype(np.int32, copy=False)

    def write_view(self, shard: int, view: int, arrays: dict[str, np.ndarray]) -> None:
        a, b = shard_range(self.meta, shard)
        for name in VIEW_FIELDS:
            if name == "hidden" and not self.meta.hidden:
                continue
            arr = self.array(name)
            self.array(name)[view, a:b] = np.asarray(arrays[name]).astype(arr.dtype, copy=False)

    def mark_committed(self, shard: int) -> None:
        self.array("committed")[shard] = 1

    # ------------------------------------------------------------------ sizes
    def nbytes_stored(self) -> int:
        """Bytes on disk of all arrays (via the store's listing)."""
        total = 0
        for name in list(self.fields) + ["committed"]:
            arr = self.array(name)
            total += int(arr.nbytes_stored())
        return total


def _get(d: dict, dotted: str):
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def estimate_bytes_per_token(
    top_k: int, views: int, n_temperatures: int, hidden_size: int | None, vocab_size: int
):
    """Uncompressed bytes per stored token position (an upper bound for the dry run)."""
    idb = 2 if vocab_size <= 65535 else 4
    per_view = idb + 1 + top_k * (idb + 4) + n_temperatures * 4 + (hidden_size * 2 if hidden_size else 0)
    return idb + views * per_view


def num_shards_for(num_sequences: int, shard_sequences: int) -> int:
    return max(1, math.ceil(num_sequences / shard_sequences))
