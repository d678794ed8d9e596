"""The signal store: a Zarr v3 group with sharded, crc32c-checked arrays (see docs/store-format.md)."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import zarr
import zarr.codecs as zc
from zarr.core.sync import sync

from offline_kd.runtime.errors import RunFailed, UsageError
from offline_kd.store.shard_codec import NOT_STORED, ChunkError, ChunkMisplaced, ShardCodec, get_row, put_row
from offline_kd.store.storage import check_store_url, filesystem, is_local, local_path, parse_options

FORMAT = "offline_kd.signal_store"
# 2: the teacher's MLM head in `teacher_head/`, --top-k 0 (no top-k arrays), hidden_dtype.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ATTR_KEY = "offline_kd"
HEAD_GROUP = "teacher_head"
# The array of each committed shard's chunk checksums (see `digest_slots`), named by the root attribute
# `digests`; stores written before it have neither and are read as before, unchecked for placement.
DIGESTS = "chunk_crc32c"
# Keys that may differ between runs writing the same store (not settings; the head check is a
# measurement of the first batch, which a resumed run or another rank does not redo).
# `compression` is not a setting of the content either: each array's codecs are in its zarr metadata,
# and a run that resumes a store (or another rank) writes with the store's own (docs/resume.md).
# `digests` neither: a store records them or not from its creation on, and a store begun before them is
# finished without them.
IGNORED_KEYS = (
    "package_version", "corpus.sources", "corpus.holdout.file", "teacher.name_or_path", "teacher_head.check",
    "compression", "digests",
)  # fmt: skip
# Stored dtype of `hidden` for each --hidden-dtype: numpy has no bfloat16 or float8, so their bits.
HIDDEN_STORAGE = {"float16": "float16", "bfloat16": "uint16", "float8_e4m3fn": "uint8"}
# Two temperatures are the same when they differ by less than this: stored ones round-trip through
# JSON exactly, the slack only absorbs round-off in a value parsed or computed elsewhere.
TEMPERATURE_TOLERANCE = 1e-6


class StoreError(UsageError, RuntimeError):
    """A store cannot be created, opened or written as asked (named in the message)."""


class StoreMismatchError(StoreError):
    """An existing store was made with different settings."""


class StoreCorruptionError(RunFailed):
    """A chunk failed its checksum or could not be decoded: the data went bad, not the input (exit 1)."""


def check_meta(meta: StoreMeta, group: zarr.Group, url: str) -> None:
    """A store's recorded settings checked against their types, ranges and the arrays' own shapes, naming the
    first field that is wrong (a store is written by this package; a wrong field is damage or tampering)."""
    ints = ("num_sequences", "max_length", "top_k", "views", "hidden_size", "vocab_size", "shard_sequences",
            "chunk_sequences", "num_shards")  # fmt: skip
    for name in ints:
        value = getattr(meta, name)
        low = 0 if name == "top_k" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise StoreCorruptionError(
                f"{url!r}: recorded {name} {value!r} is not an integer of at least {low}"
            )
    if not isinstance(meta.temperatures, list) or not all(
        isinstance(t, int | float) and t > 0 for t in meta.temperatures
    ):
        raise StoreCorruptionError(
            f"{url!r}: recorded temperatures {meta.temperatures!r} are not positive numbers"
        )
    if meta.num_shards != -(-meta.num_sequences // meta.shard_sequences):
        raise StoreCorruptionError(
            f"{url!r}: recorded num_shards {meta.num_shards} does not cover num_sequences {meta.num_sequences} "
            f"in shards of {meta.shard_sequences}"
        )
    if meta.digests not in ("", DIGESTS):
        raise StoreCorruptionError(
            f"{url!r}: recorded digests {meta.digests!r} is neither {DIGESTS!r} nor empty"
        )
    shapes = {"input_ids": (meta.num_sequences, meta.max_length), "committed": (meta.num_shards,)}
    if meta.digests:  # recorded: a store without them could not tell a misplaced chunk
        shapes[DIGESTS] = (meta.num_shards, digest_width(meta))
    required = set(shapes)
    if meta.top_k:
        shapes["topk_ids"] = (meta.views, meta.num_sequences, meta.max_length, meta.top_k)
    for name, want in shapes.items():
        if name not in required and name not in group:
            continue  # an array a reader never needs may be gone (a copy without its top-k): reads name it
        got = tuple(group[name].shape) if name in group else None
        if got != want:
            raise StoreCorruptionError(
                f"{url!r}: array {name!r} has shape {got}, not the {want} its recorded settings give"
            )


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
    hidden_dtype: str = "float16"  # what `hidden` holds (see HIDDEN_STORAGE); version 1: float16
    teacher_head: dict = field(default_factory=dict)  # {} when the store has no `teacher_head/`
    digests: str = ""  # DIGESTS when each commit records its chunks' crc32c; "" in stores made before
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

    @property
    def has_head(self) -> bool:
        return bool(self.teacher_head)

    def kl_sources(self) -> list[str]:
        """The KL sources training can use with this store alone: ``topk`` (top-k + lse) and
        ``exact`` (stored hidden states through the stored head)."""
        return [
            name for name, ok in (("topk", self.top_k > 0), ("exact", self.hidden and self.has_head)) if ok
        ]


def id_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "int32"


# ---------------------------------------------------------------------- schema
class SignalSettings(Protocol):
    """The settings the schema reads (a :class:`StoreMeta` has them all)."""

    top_k: int
    temperatures: Sequence[float]
    hidden: bool
    hidden_size: int
    hidden_dtype: str

    @property
    def id_dtype(self) -> str: ...


IDS = "ids"  # dtype of token-id arrays: uint16 up to 65,535 vocabulary entries, int32 beyond
HIDDEN = "hidden"  # dtype of the hidden states: HIDDEN_STORAGE[meta.hidden_dtype]
COMMITTED_DTYPE = "uint8"


def _no_trailing(m: SignalSettings) -> tuple[int, ...]:
    return ()


def _always(m: SignalSettings) -> bool:
    return True


def _has_topk(m: SignalSettings) -> bool:
    return m.top_k > 0


_NO_TOPK = "precomputed with --top-k 0: the exact KL source only"

# Codecs between `bytes` and `crc32c` (every chunk keeps its checksum): "zstd" (level from the
# store's `compression.level`) or "none".
CODECS = ("zstd", "none")
COMPRESSION_LEVEL = 1


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store.

    Shape: ``[V,]`` if ``per_view``, then the sequence axis ``S``, then ``L`` if
    ``per_position``, then ``trailing(meta)``. ``dtype`` is a numpy dtype name, :data:`IDS` or
    :data:`HIDDEN`.
    ``source`` says what fills it: ``"corpus"`` (packed inputs), ``"masking"`` (the masked view)
    or ``"teacher"`` (an attribute of the same name of :class:`offline_kd.teacher.model.Signals`).
    An array for which ``present(meta)`` is false is not created, written or read.
    ``codec`` is the compressor its chunks get in a new store (one of :data:`CODECS`); a store
    records its choice per array (:func:`array_codecs`), and zarr reads each array with its own.
    """

    name: str
    per_view: bool
    per_position: bool
    dtype: str
    source: Literal["corpus", "masking", "teacher"]
    trailing: Callable[[SignalSettings], tuple[int, ...]] = _no_trailing
    present: Callable[[SignalSettings], bool] = _always
    absent_because: str = ""
    codec: str = "zstd"

    def dtype_for(self, m: SignalSettings) -> str:
        if self.dtype == HIDDEN:
            return HIDDEN_STORAGE[m.hidden_dtype]
        return m.id_dtype if self.dtype == IDS else self.dtype

    def row_shape(self, m: SignalSettings, max_length: int) -> tuple[int, ...]:
        """Shape of one sequence's entry (after the view and sequence axes)."""
        return ((max_length,) if self.per_position else ()) + tuple(self.trailing(m))

    def empty(self, meta: StoreMeta, n: int) -> np.ndarray:
        """Zeros for ``n`` sequences of one view, in the stored dtype (a writer's buffer)."""
        return np.zeros((n, *self.row_shape(meta, meta.max_length)), dtype=self.dtype_for(meta))

    def layout(self, meta: StoreMeta) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(shape, chunk shape, shard shape) of the array in a store with ``meta``."""
        row = self.row_shape(meta, meta.max_length)
        view = (meta.views,) if self.per_view else ()
        one = (1,) if self.per_view else ()
        return (
            view + (meta.num_sequences,) + row,
            one + (meta.chunk_sequences,) + row,
            one + (meta.shard_sequences,) + row,
        )


# The single description of the arrays (order = creation, write and read order). Precompute's
# buffers, the recorded dtypes, the size estimate and the reader's fields all come from here.
SCHEMA: tuple[ArraySpec, ...] = (
    ArraySpec("input_ids", per_view=False, per_position=True, dtype=IDS, source="corpus"),
    ArraySpec("lengths", per_view=False, per_position=False, dtype="int32", source="corpus"),
    ArraySpec("masked_input_ids", per_view=True, per_position=True, dtype=IDS, source="masking"),
    ArraySpec("mlm_mask", per_view=True, per_position=True, dtype="bool", source="masking"),
    ArraySpec(
        "topk_ids", per_view=True, per_position=True, dtype=IDS, source="teacher",
        trailing=lambda m: (m.top_k,), present=_has_topk, absent_because=_NO_TOPK,
    ),
    ArraySpec(
        "topk_logits", per_view=True, per_position=True, dtype="float32", source="teacher",
        trailing=lambda m: (m.top_k,), present=_has_topk, absent_because=_NO_TOPK,
    ),
    ArraySpec(
        "lse", per_view=True, per_position=True, dtype="float32", source="teacher",
        trailing=lambda m: (len(m.temperatures),), present=_has_topk, absent_because=_NO_TOPK,
    ),
    # No compressor for the hidden states: from an fp32 teacher pass zstd-1 saves 8% of their bytes
    # (the low mantissa byte of a float16 is noise) and makes the whole write 2.7x as costly; from a
    # bf16 pass it saves 24% (3 zero mantissa bits) for 2x. docs/results.md, "Store I/O".
    ArraySpec(
        "hidden", per_view=True, per_position=True, dtype=HIDDEN, source="teacher",
        trailing=lambda m: (m.hidden_size,), present=lambda m: bool(m.hidden),
        absent_because="precomputed without --hidden", codec="none",
    ),
)  # fmt: skip
SPECS: dict[str, ArraySpec] = {spec.name: spec for spec in SCHEMA}
ARRAY_NAMES: tuple[str, ...] = tuple(SPECS)


def array_specs(m: SignalSettings, *, per_view: bool | None = None) -> list[ArraySpec]:
    """The arrays a store with these settings has (optionally only the per-view or per-sequence ones)."""
    return [s for s in SCHEMA if s.present(m) and (per_view is None or s.per_view == per_view)]


def digest_slots(m: StoreMeta) -> list[tuple[str, int | None]]:
    """The (array, view) pairs of a row of :data:`DIGESTS`, in order: each array of the schema that the
    store has, per view for a per-view array (view None otherwise)."""
    return [(s.name, v) for s in array_specs(m) for v in (range(m.views) if s.per_view else (None,))]


def digest_width(m: StoreMeta) -> int:
    """Values in a row of :data:`DIGESTS`: one per chunk of a shard, for each of :func:`digest_slots`."""
    return len(digest_slots(m)) * (m.shard_sequences // m.chunk_sequences)


def dtypes_for(vocab_size: int, hidden_dtype: str = "float16") -> dict[str, str]:
    """The ``dtypes`` attribute: each array's stored dtype, token-id arrays under one ``"ids"`` key."""
    out = {}
    for spec in SCHEMA:
        key = IDS if spec.dtype == IDS else spec.name
        dtype = {IDS: id_dtype_for(vocab_size), HIDDEN: HIDDEN_STORAGE[hidden_dtype]}.get(
            spec.dtype, spec.dtype
        )
        out.setdefault(key, dtype)
    out["committed"] = COMMITTED_DTYPE
    return out


def default_compression(**codecs: str) -> dict:
    """The ``compression`` attribute of a new store: the schema's codec for every array, except
    those given (``hidden="zstd"`` for ``--hidden-codec zstd``)."""
    unknown = {name: c for name, c in codecs.items() if name not in SPECS or c not in CODECS}
    if unknown:
        raise StoreError(f"unknown array or codec {unknown} (codecs: {CODECS})")
    return {
        "checksum": "crc32c",
        "level": COMPRESSION_LEVEL,
        "arrays": {spec.name: codecs.get(spec.name, spec.codec) for spec in SCHEMA},
    }


def array_codecs(meta: StoreMeta) -> dict[str, str]:
    """The codec of each array of a store with ``meta``, from its ``compression`` attribute.

    Stores written before the per-array choice record one codec for all (``{"codec": "zstd",
    "level": 1, "checksum": "crc32c"}``); reading never needs this (zarr reads each array with the
    codecs in its own metadata), creating does."""
    comp = meta.compression or default_compression()
    arrays = comp.get("arrays", {})
    return {spec.name: arrays.get(spec.name, comp.get("codec", spec.codec)) for spec in array_specs(meta)}


def temperature_index(temperatures: Sequence[float], T: float) -> int:
    """Index of ``T`` in the stored ``temperatures`` (the last axis of ``lse``).

    Equal means within :data:`TEMPERATURE_TOLERANCE` (absolute); the first match wins.
    Raises :class:`KeyError` when ``T`` was not stored.
    """
    for i, t in enumerate(temperatures):
        if abs(float(t) - float(T)) < TEMPERATURE_TOLERANCE:
            return i
    raise KeyError(f"temperature {T} is not stored; stored: {list(temperatures)}")


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


def local_root(url: str, storage_options: dict | None = None) -> Path | None:
    """The directory of a store on the local filesystem (None for an fsspec URL)."""
    if storage_options or not is_local(url):
        return None  # options given: even a file:// store goes through fsspec (see _open_group)
    return local_path(url)


def _open_group(url: str, mode: str, storage_options: dict | None):
    root = local_root(url, storage_options)
    if root is not None:
        url = str(root)  # local store: atomic writes, no fsspec needed
    options = parse_options(storage_options)  # --storage-option strings, typed
    kwargs = {"storage_options": options} if options else {}
    try:
        return zarr.open_group(str(url), mode=mode, zarr_format=3, **kwargs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, StoreError):
        raise
    except (ImportError, ValueError, TypeError) as e:  # the URL's filesystem: missing, unknown, bad options
        check_store_url(url, storage_options)
        raise StoreError(f"cannot open store {url!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 - a backend's connection or permission error, in one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise StoreError(f"cannot open store {url!r}: {type(e).__name__}: {first}") from e


def _array_layouts(meta: StoreMeta) -> dict[str, dict]:
    """``create_array`` arguments of every array of a store with ``meta`` (the commit record last)."""
    compression_level = int(meta.compression.get("level", COMPRESSION_LEVEL))
    codecs = array_codecs(meta)
    out = {}
    for spec in array_specs(meta):
        shape, chunks, shards = spec.layout(meta)
        dtype = spec.dtype_for(meta)
        if codecs[spec.name] not in CODECS:
            raise StoreError(f"array {spec.name!r}: unknown codec {codecs[spec.name]!r} (known: {CODECS})")
        compressors = [zc.ZstdCodec(level=compression_level)] if codecs[spec.name] == "zstd" else []
        out[spec.name] = dict(
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            shards=shards,
            serializer=zc.BytesCodec(),
            compressors=[*compressors, zc.Crc32cCodec()],
            fill_value=False if dtype == "bool" else 0,
        )
    if meta.digests:  # before `committed`: a store whose commit record exists has its digest record
        slots = [name if view is None else f"{name}/{view}" for name, view in digest_slots(meta)]
        out[DIGESTS] = dict(
            shape=(meta.num_shards, digest_width(meta)),
            dtype="uint64",
            chunks=(1, digest_width(meta)),  # a file a shard, written by its rank just before its flag
            serializer=zc.BytesCodec(),
            compressors=[zc.Crc32cCodec()],
            fill_value=0,
            attributes={"slots": slots, "chunks_per_slot": meta.shard_sequences // meta.chunk_sequences},
        )
    # One unsharded file per shard flag, so ranks never rewrite each other's flags.
    out["committed"] = dict(
        shape=(meta.num_shards,),
        dtype=COMMITTED_DTYPE,
        chunks=(1,),
        serializer=zc.BytesCodec(),
        compressors=[zc.Crc32cCodec()],
        fill_value=0,
    )
    return out


def _layout_of(array) -> dict:
    d = array.metadata.to_dict()
    d.pop("attributes", None)
    return d


def _ensure_arrays(g, meta: StoreMeta) -> None:
    """Every array of ``meta``, created where absent; an existing one with the same layout is kept
    as it is (never emptied: another process may have written it)."""
    for name, layout in _array_layouts(meta).items():
        want = _layout_of(zarr.create_array(zarr.storage.MemoryStore(), **layout))
        try:
            have = _layout_of(g[name])
        except KeyError:
            try:
                g.create_array(name, **layout)
                continue
            except zarr.errors.ContainsArrayError:  # created meanwhile by another process
                have = _layout_of(g[name])
        if have != want:
            # Only reached while the store has no attributes: a creation with other settings that
            # crashed before them. No shard was written into it (writers start after the
            # attributes), so the array holds nothing to keep.
            g.create_array(name, overwrite=True, **layout)


class SignalStore:
    """Reader (and writer, for precompute) of a signal store."""

    def __init__(self, group, meta: StoreMeta, url: str, storage_options: dict | None = None):
        self.group = group
        self.meta = meta
        self.url = url
        self._storage_options = storage_options
        self._arrays: dict = {}
        self._codecs: dict[str, ShardCodec | None] = {}
        self._lock = threading.Lock()  # precompute's writer threads share the caches above
        self._committed_flags: np.ndarray | None = None
        # Digests: each (array, view)'s place in a row, the rows read so far (a committed shard's row
        # never changes), and the crc32c of the chunks this process wrote, by shard, until its commit.
        self._slots = {slot: i for i, slot in enumerate(digest_slots(meta))}
        self._digest_rows: dict[int, np.ndarray] = {}
        self._written: dict[int, dict[tuple[str, int | None], np.ndarray]] = {}

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
        if d.get("format") != FORMAT or d.get("format_version") not in READABLE_VERSIONS:
            raise StoreError(
                f"{url!r}: unsupported format {d.get('format')!r} version {d.get('format_version')!r} "
                f"(this reader handles {FORMAT!r} versions {', '.join(map(str, READABLE_VERSIONS))})"
            )
        meta = StoreMeta.from_dict(d)
        check_meta(meta, g, str(url))  # before a reader sizes anything from it
        return cls(g, meta, str(url), storage_options)

    @classmethod
    def create(
        cls,
        url: str,
        meta: StoreMeta,
        storage_options: dict | None = None,
        overwrite: bool = False,
        write_head: Callable[[zarr.Group], None] | None = None,
    ) -> SignalStore:
        """Create the store, or open an existing one made with identical settings (resume).

        Arrays (and the teacher head, which ``write_head(group)`` writes) come first and the root
        attributes last, so a store whose attributes exist has all its arrays. Creation never
        deletes: an array that already exists with the same layout is kept (a concurrent or crashed
        creation made it). A store with different settings is refused with
        :class:`StoreMismatchError` listing the differing keys, unless ``overwrite``, which deletes
        the store's own entries first (never anything else there). A directory (or prefix) holding
        anything but a store is refused (:func:`check_output`). A full disk raises :class:`StoreError`.
        """
        if not meta.compression:
            meta.compression = default_compression()
        if not meta.digests:  # a new store records its digests (a resumed one keeps what it has)
            meta.digests = DIGESTS
        root = local_root(url, storage_options)
        if root is not None and root.exists() and not root.is_dir():
            raise StoreError(f"{str(url)!r} is an existing file, not a store directory; pick another output")
        try:
            return cls._create(url, meta, storage_options, overwrite, write_head)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(
                    f"disk full while creating {str(url)!r}; free space and rerun the same command "
                    "(the store is created again where it stopped)"
                ) from e
            raise

    @classmethod
    def _create(
        cls,
        url: str,
        meta: StoreMeta,
        storage_options: dict | None,
        overwrite: bool,
        write_head: Callable[[zarr.Group], None] | None,
    ) -> SignalStore:
        want = meta.as_dict()
        state = check_output(url, storage_options)  # before anything is written or deleted
        remove_partial_files(url, storage_options, metadata=True)
        if overwrite:
            if state.kind != "new":
                _remove_store_entries(url, storage_options, state.ours)
        else:
            existing = cls._reopen_for_resume(url, want, storage_options)
            if existing is not None:
                return existing
        g = _open_group(url, "a", storage_options)
        _ensure_arrays(g, meta)
        if write_head is not None:
            write_head(g)  # the same teacher writes the same head: rewriting it loses nothing
        g.attrs[ATTR_KEY] = want
        return cls(g, StoreMeta.from_dict(want), str(url), storage_options)

    @classmethod
    def _reopen_for_resume(cls, url: str, want: dict, storage_options: dict | None) -> SignalStore | None:
        """The existing store at ``url`` if it has the settings ``want``; None if there is none
        (or only the arrays of a creation that crashed before its attributes)."""
        try:
            g = _open_group(url, "r+", storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return None
        have = g.attrs.asdict().get(ATTR_KEY)
        if have is not None:
            diff = diff_meta(have, want)
            if diff:
                details = "; ".join(f"{k}: store={_get(have, k)!r} requested={_get(want, k)!r}" for k in diff)
                raise StoreMismatchError(
                    f"{url!r} was made with different settings ({details}); "
                    "use a new output path or overwrite=True (--overwrite)"
                )
            if "committed" not in g:  # deleted first by an --overwrite that was stopped
                raise StoreError(
                    f"{url!r} has no commit record: an --overwrite of it was interrupted; rerun with --overwrite"
                )
            return cls(g, StoreMeta.from_dict(have), str(url), storage_options)
        # No attributes: a creation that crashed (attributes come last) is redone. `check_output` has
        # refused anything but the store's own entries.
        return None

    # ------------------------------------------------------------------ reading
    def array(self, name: str):
        with self._lock:
            if name not in self._arrays:
                spec = SPECS.get(name)
                if spec is not None and not spec.present(self.meta):
                    raise KeyError(f"{self.url!r} has no {name!r} array ({spec.absent_because})")
                self._arrays[name] = self.group[name]
            return self._arrays[name]

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the arrays this store has, in schema order."""
        return tuple(spec.name for spec in array_specs(self.meta))

    def committed(self) -> np.ndarray:
        return self._get("committed", (slice(None),), 0, self.meta.num_shards, None).astype(bool)

    def is_complete(self) -> bool:
        return bool(self.committed().all())

    def temperature_index(self, T: float) -> int:
        """Index of ``T`` into ``lse``'s last axis (see :func:`temperature_index`)."""
        try:
            return temperature_index(self.meta.temperatures, T)
        except KeyError:
            raise KeyError(
                f"temperature {T} was not stored in {self.url!r}; stored: {self.meta.temperatures}"
            ) from None

    def read(
        self, view: int, start: int, stop: int, fields: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Sequences ``[start, stop)`` of ``view``; see the class docs for the keys."""
        self._check_range(view, start, stop)
        want = self.fields if fields is None else tuple(fields)
        out = {}
        for name in want:
            spec = SPECS.get(name)
            if spec is None:
                raise KeyError(f"unknown field {name!r}; known: {ARRAY_NAMES}")
            if spec.per_view:
                out[name] = self._get(name, (view, slice(start, stop)), start, stop, view)
            else:
                out[name] = self._get(name, (slice(start, stop),), start, stop, None)
        return out

    def read_into(
        self, view: int, start: int, stop: int, out: dict[str, np.ndarray], positions: np.ndarray
    ) -> None:
        """:meth:`read` of the fields ``out`` names, sequence ``start + i`` into row ``positions[i]``
        of ``out[field]`` (the training reader's shuffled batch, filled without a copy in between)."""
        self._check_range(view, start, stop)
        for name, dest in out.items():
            spec = SPECS[name]
            codec = self._codec(spec)
            v = view if spec.per_view else None
            if codec is not None and codec.aligned(start, stop):
                self._check_files(name, codec, start, stop, v)
                if self._codec_read(name, codec, start, stop, v, out=dest, positions=positions) is not None:
                    continue
            dest[positions] = self.read(view, start, stop, fields=[name])[name]

    def _check_range(self, view: int, start: int, stop: int) -> None:
        if not 0 <= view < self.meta.views:
            raise IndexError(f"view {view} out of range: the store has {self.meta.views} views")
        if not 0 <= start <= stop <= self.meta.num_sequences:
            raise IndexError(f"range [{start}, {stop}) outside [0, {self.meta.num_sequences})")

    def _get(self, name: str, sel: tuple, start: int, stop: int, view: int | None):
        arr = self.array(name)
        codec = self._codec(SPECS[name]) if name in SPECS else None
        if codec is not None and start < stop:
            self._check_files(name, codec, start, stop, view)  # zarr reads a missing file as zeros
            # Whole chunks (zarr decodes them whole too): zarr's result for less CPU, and each chunk
            # checked against the digests of its shard's commit, which zarr knows nothing of.
            c, n = codec.chunk_rows, codec.array.shape[codec.seq_axis]
            a, b = start - start % c, min(-(-stop // c) * c, n)
            rows = self._codec_read(name, codec, a, b, view)
            if rows is not None:
                return rows[start - a : stop - a]
        try:
            return arr[sel]
        except Exception as e:  # noqa: BLE001 - decode/checksum errors surface as various types
            if isinstance(e, (IndexError, KeyError, TypeError)):
                raise
            raise self._locate_corruption(name, start, stop, view, e) from e

    def _check_files(self, name: str, codec, start: int, stop: int, view: int | None) -> None:
        """Refuse rows of a committed shard whose file is gone (never zeros for data that was written)."""
        rows = codec.shard_rows
        for s in range(start // rows, (stop - 1) // rows + 1):
            if codec.stored(s, view):
                continue  # the usual case: no need to consult the commit record
            shard, committed = (s * rows) // self.meta.shard_sequences, self._committed_cache()
            if shard < len(committed) and committed[shard]:
                v = "" if view is None else f" view {view},"
                raise StoreCorruptionError(
                    f"{self.url!r}: array {name!r}{v} shard {shard} is committed but its file is missing"
                )

    def _committed_cache(self) -> np.ndarray:
        """The commit record, read once per open store (shards only ever become committed)."""
        if self._committed_flags is None or not self._committed_flags.all():
            self._committed_flags = np.asarray(self.committed(), dtype=bool)
        return self._committed_flags

    def _is_committed(self, shard: int) -> bool:
        if self._committed_flags is not None and self._committed_flags[shard]:
            return True
        return bool(self._get("committed", (slice(shard, shard + 1),), shard, shard + 1, None)[0])

    def _codec_read(self, name: str, codec: ShardCodec, start: int, stop: int, view: int | None, **into):
        """``codec.read``, or None when it cannot take the chunks as they are (zarr then reads them
        and names what is wrong). A chunk that is not the one committed in its place is refused here:
        zarr would read it as good."""
        try:
            return codec.read(start, stop, view, **into)
        except ChunkMisplaced as e:
            raise self._misplaced(name, e) from None
        except StoreCorruptionError:  # the digest record itself (chunk_digests)
            raise
        except Exception:  # noqa: BLE001 - read through zarr instead
            return None

    def _misplaced(self, name: str, e: ChunkMisplaced) -> StoreCorruptionError:
        c = self.meta.chunk_sequences
        a = e.shard * self.meta.shard_sequences + e.chunk * c
        b = min(a + c, self.meta.num_sequences)
        v = "" if e.view is None else f" view {e.view},"
        found = "no chunk" if e.got == NOT_STORED else f"a chunk with crc32c {e.got:08x}"
        want = "none" if e.want == NOT_STORED else f"{e.want:08x}"
        return StoreCorruptionError(
            f"{self.url!r}: array {name!r}{v} shard {e.shard}: the chunk of sequences [{a}, {b}) is not the "
            f"one committed there (found {found}, the commit recorded {want}): a file moved or copied from "
            "another place, or rewritten since"
        )

    def chunk_digests(self, shard: int) -> np.ndarray | None:
        """The crc32c of every chunk of ``shard`` at its commit (a row of :data:`DIGESTS`, laid out by
        :func:`digest_slots`; :data:`NOT_STORED` for a chunk of fill values), read once per open store.

        None for a store that records none (made before them) and for an uncommitted shard without
        a row; a committed shard without one, or with a damaged one, is :class:`StoreCorruptionError`."""
        if not self.meta.digests:
            return None
        row = self._digest_rows.get(shard)
        if row is not None:
            return row
        try:
            row = get_row(self.array(DIGESTS), shard)
        except ChunkError as e:
            raise StoreCorruptionError(f"{self.url!r}: the digests of shard {shard} are corrupt ({e})") from e
        if row is None:
            if self._is_committed(shard):
                raise StoreCorruptionError(
                    f"{self.url!r}: shard {shard} is committed but its digests ({DIGESTS}) are missing"
                )
            return None
        self._digest_rows[shard] = row
        return row

    def _expected(self, name: str, shard: int, view: int | None) -> np.ndarray | None:
        """The crc32c each chunk of ``name`` (``view``) in ``shard`` had at its commit (None: unrecorded)."""
        row = self.chunk_digests(shard)
        if row is None:
            return None
        n = self.meta.shard_sequences // self.meta.chunk_sequences
        i = self._slots[(name, view)]
        return row[i * n : (i + 1) * n]

    def _locate_corruption(self, name: str, start: int, stop: int, view: int | None, err: Exception):
        arr = self.array(name)
        if name == "committed":  # one flag a chunk, one chunk a shard
            c, n, per_shard = 1, arr.shape[0], 1
        else:
            axis = 1 if SPECS[name].per_view else 0  # the sequence axis
            c, n, per_shard = arr.chunks[axis], arr.shape[axis], self.meta.shard_sequences
        v = "" if view is None else f" view {view},"
        for a in range((start // c) * c, stop, c):
            b = min(a + c, n)
            sel = (slice(a, b),) if view is None else (view, slice(a, b))
            try:
                arr[sel]
            except Exception as e2:  # noqa: BLE001
                return StoreCorruptionError(
                    f"{self.url!r}: array {name!r}{v} chunk of sequences [{a}, {b}) "
                    f"(shard {a // per_shard}) is corrupt: {e2}"
                )
        return StoreCorruptionError(
            f"{self.url!r}: array {name!r}{v} sequences [{start}, {stop}) is corrupt: {err}"
        )

    # ------------------------------------------------------------------ writing
    def write_inputs(self, shard: int, input_ids: np.ndarray, lengths: np.ndarray) -> None:
        """The per-sequence arrays of ``shard`` (cast to their stored dtypes)."""
        self._write(shard, None, {"input_ids": input_ids, "lengths": lengths})

    def write_view(self, shard: int, view: int, arrays: dict[str, np.ndarray]) -> None:
        """Every per-view array of ``shard`` in ``view`` (extra keys, e.g. absent arrays, are ignored)."""
        self._write(shard, view, arrays)

    def _write(self, shard: int, view: int | None, arrays: dict[str, np.ndarray]) -> None:
        a, b = shard_range(self.meta, shard)
        for spec in array_specs(self.meta, per_view=view is not None):
            arr = self.array(spec.name)
            data = np.asarray(arrays[spec.name]).astype(arr.dtype, copy=False)
            encoder = self._codec(spec)
            crcs = None
            if encoder is not None:  # the same bytes as zarr's write below, at a fraction of its CPU
                crcs = encoder.write(shard, data, view)
            else:
                arr[(slice(a, b),) if view is None else (view, slice(a, b))] = data
            with self._lock:  # kept for the commit (one writer thread a shard; the dict is shared)
                written = self._written.setdefault(shard, {})
                if crcs is None:
                    written.pop((spec.name, view), None)  # read from its file at the commit
                else:
                    written[(spec.name, view)] = crcs

    def _codec(self, spec: ArraySpec) -> ShardCodec | None:
        array = self.array(spec.name)
        with self._lock:
            if spec.name not in self._codecs:
                codec = ShardCodec.for_array(array, int(spec.per_view))
                if codec is not None and self.meta.digests:
                    codec.expected = functools.partial(self._expected, spec.name)
                self._codecs[spec.name] = codec
            return self._codecs[spec.name]

    def mark_committed(self, shard: int) -> None:
        """Commit ``shard``: its digests first (where the store records them), then its flag."""
        if self.meta.digests:
            self._record_digests(shard)
        self.array("committed")[shard] = 1

    def _record_digests(self, shard: int) -> None:
        """The row of :data:`DIGESTS` for ``shard``: the crc32c of each chunk this process wrote, read
        from the files (and checked) for an array written otherwise (zarr's own write, another process)."""
        with self._lock:
            written = self._written.pop(shard, {})
        parts = []
        for name, view in digest_slots(self.meta):
            crcs = written.get((name, view))
            if crcs is None:  # this store's encoder may be off (benchmarks/store_io.py's zarr writer)
                spec = SPECS[name]
                codec = self._codec(spec) or ShardCodec.for_array(self.array(name), int(spec.per_view))
                if codec is None:
                    raise StoreError(
                        f"{self.url!r}: array {name!r} has a layout whose chunks cannot be digested"
                    )
                crcs = codec.stored_crcs(shard, view)
            parts.append(crcs)
        put_row(self.array(DIGESTS), shard, np.concatenate(parts))

    def remove_partial_files(self, shards: Iterable[int]) -> list[str]:
        """Delete the partial files a killed writer left for ``shards`` (see :func:`remove_partial_files`)."""
        return remove_partial_files(self.url, self._storage_options, shards=shards, meta=self.meta)

    # ------------------------------------------------------------------ sizes
    def nbytes_stored(self) -> int:
        """Bytes on disk of all signal arrays and the commit record (not the teacher head)."""
        total = 0
        for name in [*self.fields, *([DIGESTS] if self.meta.digests else []), "committed"]:
            arr = self.array(name)
            total += int(arr.nbytes_stored())
        return total

    def head_nbytes_stored(self) -> int:
        """Bytes on disk of the teacher head's arrays (0 without one): a fixed cost, not per token."""
        if HEAD_GROUP not in self.group:
            return 0
        return sum(int(a.nbytes_stored()) for _, a in self.group[HEAD_GROUP].arrays())


PARTIAL_SUFFIX = ".partial"  # zarr's local store writes `<name>.<uuid>.partial`, then renames it
# What a store holds at its root: its arrays, commit record, digests and head, and the group's metadata.
STORE_ENTRIES = frozenset({*ARRAY_NAMES, "committed", DIGESTS, HEAD_GROUP, "zarr.json"})


def _is_store_entry(name: str) -> bool:
    return name in STORE_ENTRIES or (name.startswith("zarr.") and name.endswith(PARTIAL_SUFFIX))


@dataclass(frozen=True)
class OutputState:
    """What a store URL holds: ``new`` (nothing, or an empty directory), ``store`` (a signal store's
    attributes), ``unfinished`` (only a store's entries, no attributes: a creation that stopped) or
    ``foreign`` (anything else). ``ours``: the store's root entries there; ``others``: the rest."""

    kind: Literal["new", "store", "unfinished", "foreign"]
    ours: tuple[str, ...] = ()
    others: tuple[str, ...] = ()


def _root_listing(url: str, storage_options: dict | None) -> tuple[list[str], bytes | None]:
    """The names at the root of ``url`` (none when it does not exist) and its ``zarr.json``'s bytes."""
    root = local_root(url, storage_options)
    if root is not None:
        if not root.is_dir():
            return [], None
        meta = root / "zarr.json"
        return sorted(os.listdir(root)), (meta.read_bytes() if meta.is_file() else None)
    fs = filesystem(url, storage_options)
    path = fs._strip_protocol(str(url)).rstrip("/")
    fs.invalidate_cache(path)  # another process may have just written it
    try:
        names = sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)})
    except FileNotFoundError:
        return [], None
    try:
        return names, fs.cat_file(f"{path}/zarr.json")
    except FileNotFoundError:
        return names, None


def output_state(url: str, storage_options: dict | None = None) -> OutputState:
    """What ``url`` holds (:class:`OutputState`), read without zarr and without writing anything."""
    names, root_meta = _root_listing(url, storage_options)
    if not names:
        return OutputState("new")
    ours = tuple(n for n in names if _is_store_entry(n))
    others = tuple(n for n in names if not _is_store_entry(n))
    attrs = None
    if root_meta is not None:
        try:
            doc = json.loads(root_meta)
            attrs = (doc.get("attributes") or {}) if doc.get("node_type") == "group" else None
        except (ValueError, AttributeError):
            attrs = None
        if attrs is None or (attrs and ATTR_KEY not in attrs):  # an array, or another tool's group
            return OutputState("foreign", tuple(n for n in ours if n != "zarr.json"), ("zarr.json", *others))
    if attrs:
        return OutputState("store", ours, others)  # what else is there is the user's: left alone
    return OutputState("foreign" if others else "unfinished", ours, others)


def check_output(url: str, storage_options: dict | None = None, label: str | None = None) -> OutputState:
    """Refuse, naming ``label`` (default: the URL), an output that holds anything but a signal store:
    neither writing into it nor ``--overwrite`` may touch files the store did not write."""
    state = output_state(url, storage_options)
    if state.kind == "foreign":
        shown = ", ".join(state.others[:5]) + (", …" if len(state.others) > 5 else "")
        raise StoreError(
            f"{label or repr(str(url))} is not a signal store: it holds {shown}, which kd precompute did not "
            "write; choose a new or empty directory (nothing was written or deleted)"
        )
    return state


def _remove_store_entries(url: str, storage_options: dict | None, entries: Iterable[str]) -> None:
    """Delete a store's own root entries (``--overwrite``), leaving anything else where it is.

    The commit record goes first, so that an overwrite stopped midway leaves no committed shard behind
    (resuming it is refused, and a rerun of the overwrite finishes it), then the root metadata."""
    g = _open_group(url, "a", storage_options)
    first = ["committed", DIGESTS, "zarr.json"]
    for name in [*first, *sorted(set(entries) - set(first))]:
        path = g.store_path / name
        if name == "zarr.json" or name.endswith(PARTIAL_SUFFIX):
            sync(path.delete())
        else:
            sync(path.delete_dir())


def _partial_shard(meta: StoreMeta, rel: Path) -> int | None:
    """The shard a chunk file's partial belongs to (None for metadata or unknown paths)."""
    parts = rel.parts
    if len(parts) < 3 or parts[1] != "c":
        return None
    indices = list(parts[2:-1]) + [parts[-1].split(".", 1)[0]]
    if parts[0] in ("committed", DIGESTS):
        axis = 0  # one flag (one row of digests) a chunk, one chunk a shard
    elif parts[0] in SPECS:
        axis = 1 if SPECS[parts[0]].per_view else 0  # shard shape is 1 along the view axis
    else:
        return None
    try:
        return int(indices[axis])
    except (IndexError, ValueError):
        return None


def remove_partial_files(
    url: str,
    storage_options: dict | None = None,
    *,
    shards: Iterable[int] = (),
    meta: StoreMeta | None = None,
    metadata: bool = False,
) -> list[str]:
    """Delete the temporary files a killed writer left in a local store; return their paths.

    Zarr's local store writes every file as ``<name>.<uuid>.partial`` and renames it; a
    ``kill -9`` in between leaves the partial file. Removed: those of the chunk files of
    ``shards`` (with ``meta``; the caller's own shards, which no other process writes) and, with
    ``metadata``, those of ``zarr.json`` files and of the teacher head (only the creator writes them). Object stores
    write each object whole and have none.
    """
    root = local_root(url, storage_options)
    if root is None or not root.is_dir():
        return []
    wanted = set(shards)
    removed = []
    for dirpath, dirnames, names in os.walk(root):
        if Path(dirpath) == root:  # only the store's own entries: anything else there is the user's
            dirnames[:] = [d for d in dirnames if d in STORE_ENTRIES]
            names = [n for n in names if _is_store_entry(n)]
        for name in names:
            if not name.endswith(PARTIAL_SUFFIX):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            if name.startswith("zarr.") or rel.parts[0] == HEAD_GROUP:
                drop = metadata  # metadata and the teacher head: written by the creator alone
            else:
                drop = meta is not None and _partial_shard(meta, rel) in wanted
            if drop:
                path.unlink(missing_ok=True)
                removed.append(str(rel))
    return sorted(removed)


def open_store(url: str, storage_options: dict | None = None) -> SignalStore:
    """Open a finished store for reading (local path or fsspec URL)."""
    return SignalStore.open(url, mode="r", storage_options=storage_options)


def _get(d: dict, dotted: str):
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


@dataclass(frozen=True)
class _EstimateSettings:
    top_k: int
    temperatures: tuple[float, ...]
    hidden: bool
    hidden_size: int
    hidden_dtype: str
    id_dtype: str


def estimate_bytes_per_token(
    top_k: int,
    views: int,
    n_temperatures: int,
    hidden_size: int | None,
    vocab_size: int,
    hidden_dtype: str = "float16",
) -> int:
    """Uncompressed bytes per stored token position (an upper bound for the dry run).

    Counts every array with a position axis (``lengths`` and ``committed`` are per sequence
    and per shard, negligible; so is the teacher head, a fixed size); ``hidden_size`` None or 0
    means no hidden states.
    """
    settings = _EstimateSettings(
        top_k=top_k,
        temperatures=(1.0,) * n_temperatures,
        hidden=bool(hidden_size),
        hidden_size=hidden_size or 0,
        hidden_dtype=hidden_dtype,
        id_dtype=id_dtype_for(vocab_size),
    )
    total = 0
    for spec in array_specs(settings):
        if spec.per_position:
            per_row = math.prod(spec.trailing(settings)) * np.dtype(spec.dtype_for(settings)).itemsize
            total += per_row * (views if spec.per_view else 1)
    return total


def num_shards_for(num_sequences: int, shard_sequences: int) -> int:
    return max(1, math.ceil(num_sequences / shard_sequences))
