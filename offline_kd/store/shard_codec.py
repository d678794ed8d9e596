"""Whole-shard writes and chunk-aligned reads without zarr's generic paths, byte-identical to them.

Zarr's ``array[shard] = data`` handles any selection and any codec chain; for the one case
precompute needs (a whole shard at a time, chunked along the sequence axis only, the codec chains of
docs/store-format.md) that generality costs more CPU than the encoding itself: it compares every
chunk with the fill value through a void-dtype ``array_equal`` and copies the data three times
(checksum append, shard concatenation). :class:`ShardCodec` encodes exactly what zarr would
write (tested byte for byte against it, ``tests/test_store_io.py``):

* inner chunks in order along the sequence axis (zarr's Morton order, which is the linear order
  when only one axis has more than one chunk), each ``bytes(little)`` → optional ``zstd`` →
  ``crc32c`` (4 little-endian bytes appended);
* a chunk whose bytes are all zero (every fill value of the store is 0 / false, compared bitwise
  by zarr) is left out, its index entry ``(2**64 - 1, 2**64 - 1)``;
* the index (``uint64`` offset and length per chunk, ``bytes(little)`` → ``crc32c``) at the end;
* a shard of only empty chunks is not written (an existing file of it is deleted).

The file goes through the array's own zarr store (atomic on local disk, one object on fsspec), so
partial-file cleanup and object stores are unchanged. :meth:`ShardCodec.read` reads whole chunks
the same way back: the shard index, then the chunks of the range in one byte-range request, each
checked against its crc32c and decoded straight into the result. It raises on anything unexpected,
and its caller (`SignalStore`) then reads through zarr, which names the bad chunk. Given the crc32c
each chunk had when its shard was committed (:attr:`ShardCodec.expected`), a read also refuses an
intact chunk that is not the one committed at its position (:class:`ChunkMisplaced`): a crc32c
alone says that a chunk is whole, not that it is the right one. An array with
any other layout (another codec, a non-zero fill value, chunks along other axes) returns ``None``
from :meth:`ShardCodec.for_array` and is written and read by zarr as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import google_crc32c
import numpy as np
import zarr
import zarr.codecs as zc
from numcodecs.zstd import Zstd
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

_EMPTY = np.iinfo(np.uint64).max  # index entry of a chunk that is not stored
_PROTOTYPE = default_buffer_prototype()


class ChunkError(ValueError):
    """A chunk or shard index that :meth:`ShardCodec.read` cannot take as it is (zarr then reads it)."""


class ChunkMisplaced(ChunkError):
    """An intact chunk (or a missing one) where the commit recorded another: never read through zarr,
    which would take it. ``got`` and ``want`` are crc32c values, :data:`NOT_STORED` for no chunk."""

    def __init__(self, shard: int, view: int | None, chunk: int, got: int, want: int) -> None:
        super().__init__(f"shard {shard}, chunk {chunk}: crc32c {got:#x}, committed {want:#x}")
        self.shard, self.view, self.chunk, self.got, self.want = shard, view, chunk, got, want


# The crc32c recorded for a chunk that is not stored (all fill): the shard index's own mark.
NOT_STORED = int(_EMPTY)
# Given (shard, view), the crc32c of each of that shard's chunks at its commit, or None (unrecorded).
Expected = Callable[[int, int | None], np.ndarray | None]


class ShardCodec:
    """Encodes and writes whole shards, reads whole chunks, of one zarr array (see the module docstring)."""

    def __init__(self, array: zarr.Array, seq_axis: int, zstd: Zstd | None) -> None:
        self.array = array
        self.seq_axis = seq_axis
        self.zstd = zstd
        self.chunk_rows = array.metadata.codecs[0].chunk_shape[seq_axis]
        self.shard_rows = array.shards[seq_axis]
        self.row_shape = tuple(array.shape[seq_axis + 1 :])
        self.dtype = array.dtype
        self.row_bytes = math.prod(self.row_shape) * self.dtype.itemsize
        self._indexes: dict[tuple[int, int | None], np.ndarray] = {}
        self.expected: Expected | None = None  # set by a store that records its chunks' crc32c

    @classmethod
    def for_array(cls, array: zarr.Array, seq_axis: int) -> ShardCodec | None:
        """An encoder for ``array`` if its layout is one this module reproduces exactly, else None."""
        codecs = array.metadata.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], zc.ShardingCodec):
            return None
        sharding = codecs[0]
        inner, index = list(sharding.codecs), list(sharding.index_codecs)
        if sharding.index_location != zc.sharding.ShardingCodecIndexLocation.end:
            return None
        if not (_is_bytes_le(index[:1]) and len(index) == 2 and isinstance(index[1], zc.Crc32cCodec)):
            return None
        if not (inner and _is_bytes_le(inner[:1]) and isinstance(inner[-1], zc.Crc32cCodec)):
            return None
        middle = inner[1:-1]
        if len(middle) > 1 or (middle and not isinstance(middle[0], zc.ZstdCodec)):
            return None
        # Only the sequence axis may span several chunks: then Morton order is the linear order.
        chunks, shards = sharding.chunk_shape, array.shards
        if any(c != s for i, (c, s) in enumerate(zip(chunks, shards, strict=True)) if i != seq_axis):
            return None
        if any(s != n for s, n in zip(shards[seq_axis + 1 :], array.shape[seq_axis + 1 :], strict=True)):
            return None
        if array.dtype.byteorder == ">" or not _fill_is_zero(array):
            return None
        zstd = Zstd(level=middle[0].level, checksum=middle[0].checksum) if middle else None
        return cls(array, seq_axis, zstd)

    def encode(self, rows: np.ndarray) -> np.ndarray | None:
        """The shard file's bytes for ``rows`` (at most one shard of rows; the rest is fill), or
        None when every chunk is empty."""
        return self._encode(rows)[0]

    def _encode(self, rows: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """:meth:`encode`, and the crc32c of each chunk (:data:`NOT_STORED` for an empty one)."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        n, c = rows.shape[0], self.chunk_rows
        flat = rows.reshape(n, -1).view(np.uint8)
        n_chunks = self.shard_rows // c
        row_bytes = flat.shape[1]
        pieces: list = []
        index = np.full((n_chunks, 2), _EMPTY, dtype="<u8")
        crcs = np.full(n_chunks, _EMPTY, dtype=np.uint64)
        offset = 0
        for j in range(n_chunks):
            part = flat[j * c : min((j + 1) * c, n)]
            if part.size == 0 or not _any_nonzero(part):
                continue
            if part.shape[0] < c:  # the last chunk of a partial shard: fill-padded, as zarr does
                padded = np.zeros((c, row_bytes), dtype=np.uint8)
                padded[: part.shape[0]] = part
                part = padded
            data = part.reshape(-1)
            if self.zstd is not None:
                data = np.frombuffer(self.zstd.encode(data), dtype=np.uint8)
            pieces.append(data)
            index[j] = (offset, data.size + 4)
            offset += data.size + 4
        if not pieces:
            return None, crcs
        out = np.empty(offset + index.nbytes + 4, dtype=np.uint8)
        pos = 0
        for j, data in zip(np.flatnonzero(index[:, 0] != _EMPTY), pieces, strict=True):
            out[pos : pos + data.size] = data
            crcs[j] = _put_crc(out, pos + data.size, data)
            pos += data.size + 4
        out[pos : pos + index.nbytes] = index.reshape(-1).view(np.uint8)
        _put_crc(out, pos + index.nbytes, out[pos : pos + index.nbytes])
        return out, crcs

    def write(self, shard: int, rows: np.ndarray, view: int | None = None) -> np.ndarray:
        """Encode ``rows`` as shard ``shard`` (of ``view`` for a per-view array) and store the file;
        the crc32c of each chunk written (:data:`NOT_STORED` for an empty one)."""
        path = self._path(shard, view)
        self._indexes.pop((shard, view), None)
        out, crcs = self._encode(rows)
        if out is None:
            sync(path.delete())
        else:
            sync(path.set(default_buffer_prototype().buffer.from_array_like(out)))
        return crcs

    def stored_crcs(self, shard: int, view: int | None = None) -> np.ndarray:
        """The crc32c of each chunk of the shard's file as it is (:data:`NOT_STORED` for an empty one),
        each checked against its chunk: what a commit records of a shard written some other way."""
        n_chunks = self.shard_rows // self.chunk_rows
        crcs = np.full(n_chunks, _EMPTY, dtype=np.uint64)
        raw = sync(self._path(shard, view).get(_PROTOTYPE))
        if raw is None:
            return crcs
        data = raw.as_numpy_array()
        tail = data[-(n_chunks * 16 + 4) :]
        _check_crc(tail, "shard index")
        index = tail[:-4].view("<u8").reshape(n_chunks, 2)
        for j in np.flatnonzero(index[:, 0] != _EMPTY):
            chunk = data[int(index[j, 0]) : int(index[j].sum())]
            _check_crc(chunk, "chunk")
            crcs[j] = _crc_of(chunk)
        return crcs

    def aligned(self, start: int, stop: int) -> bool:
        """Whether rows ``[start, stop)`` are whole chunks (the last one may end with the array)."""
        n, c = self.array.shape[self.seq_axis], self.chunk_rows
        return 0 <= start < stop <= n and start % c == 0 and (stop % c == 0 or stop == n)

    def read(
        self,
        start: int,
        stop: int,
        view: int | None = None,
        out: np.ndarray | None = None,
        positions: np.ndarray | None = None,
    ) -> np.ndarray:
        """Rows ``[start, stop)`` (of ``view``), chunk-aligned (:meth:`aligned`), as zarr reads them.

        With ``out``, row ``start + i`` goes to ``out[positions[i]]`` (the reader's shuffled batch,
        filled without a copy in between). Raises :class:`ChunkError` (or the decoder's error) on a
        chunk or index it cannot take."""
        if out is None:
            out = np.empty((stop - start, *self.row_shape), dtype=self.dtype)
        if positions is None:
            positions = np.arange(stop - start)
        flat = out.reshape(out.shape[0], -1).view(np.uint8)
        R = self.shard_rows
        for shard in range(start // R, (stop - 1) // R + 1):
            a, b = max(start, shard * R), min(stop, (shard + 1) * R)
            self._read_shard(
                shard, view, a - shard * R, b - shard * R, flat, positions[a - start : b - start]
            )
        return out

    def stored(self, shard: int, view: int | None = None) -> bool:
        """Whether shard `shard` (of `view`) has a file: a committed shard without one lost it."""
        return self._index(shard, view) is not None

    def _index(self, shard: int, view: int | None) -> np.ndarray | None:
        """The shard's index [chunks, (offset, size)], None without a file. Kept: a shard is written
        whole once, and a stale one (a store read while being rewritten) fails a checksum below."""
        key = (shard, view)
        if key not in self._indexes:
            n_chunks = self.shard_rows // self.chunk_rows
            tail = sync(
                self._path(shard, view).get(_PROTOTYPE, byte_range=SuffixByteRequest(n_chunks * 16 + 4))
            )
            if tail is None:
                return None  # not kept: the shard may still be written
            index_bytes = tail.as_numpy_array()
            _check_crc(index_bytes, "shard index")
            self._indexes[key] = index_bytes[:-4].view("<u8").reshape(n_chunks, 2)
        return self._indexes[key]

    def _read_shard(
        self, shard: int, view: int | None, a: int, b: int, flat: np.ndarray, pos: np.ndarray
    ) -> None:
        """Rows ``[a, b)`` of one shard (chunk-aligned, relative to it) into rows ``pos`` of ``flat``."""
        c, index = self.chunk_rows, self._index(shard, view)
        js = range(a // c, -(-b // c))
        want = None if self.expected is None else self.expected(shard, view)
        if index is None:  # no file: every chunk of the shard is empty
            _check_placed(want, shard, view, js, None)
            flat[pos] = 0
            return
        stored = [j for j in js if index[j, 0] != _EMPTY]
        if stored:  # the chunks of a shard lie in order, one after the other: one request for all
            lo, hi = int(index[stored[0], 0]), int(index[stored[-1]].sum())
            span = sync(self._path(shard, view).get(_PROTOTYPE, byte_range=RangeByteRequest(lo, hi)))
            if span is None or len(span) != hi - lo:
                raise ChunkError(f"shard {shard}: shorter than its index says")
            span = span.as_numpy_array()
        for j in js:
            rows = pos[j * c - a : min((j + 1) * c, b) - a]
            if index[j, 0] == _EMPTY:
                _check_placed(want, shard, view, (j,), None)
                flat[rows] = 0
                continue
            off, size = int(index[j, 0]) - lo, int(index[j, 1])
            chunk = span[off : off + size]
            decoded = self._decode(chunk)  # its crc32c checked: the chunk is intact; below, in its place
            _check_placed(want, shard, view, (j,), chunk)
            flat[rows] = decoded[: len(rows)]

    def _decode(self, data: np.ndarray) -> np.ndarray:
        """One stored chunk (payload + crc32c) as its rows of bytes [chunk rows, row bytes]."""
        _check_crc(data, "chunk")
        payload, size = data[:-4], self.chunk_rows * self.row_bytes
        if self.zstd is not None:  # decoded to its own size, checked below (zarr would refuse another)
            payload = np.frombuffer(self.zstd.decode(payload), dtype=np.uint8)
        if payload.size != size:
            raise ChunkError(f"chunk of {payload.size} bytes, {size} expected")
        return payload.reshape(self.chunk_rows, self.row_bytes)

    def _path(self, shard: int, view: int | None):
        coords = ((view,) if view is not None else ()) + (shard,) + (0,) * len(self.row_shape)
        return self.array.store_path / self.array.metadata.encode_chunk_key(coords)


def _is_bytes_le(codecs: list) -> bool:
    return (
        len(codecs) == 1
        and isinstance(codecs[0], zc.BytesCodec)
        and codecs[0].endian in (None, zc.bytes.Endian.little)
    )


def _fill_is_zero(array: zarr.Array) -> bool:
    fill = np.asarray(array.fill_value, dtype=array.dtype)
    return not fill.reshape(1).view(np.uint8).any()


def _any_nonzero(part: np.ndarray) -> bool:
    """Whether a C-contiguous uint8 block has a non-zero byte (wide words where they fit)."""
    flat = part.reshape(-1)
    if flat.size % 8 == 0:
        return bool(flat.view(np.uint64).any())
    return bool(flat.any())


def _put_crc(out: np.ndarray, at: int, data: np.ndarray) -> int:
    crc = google_crc32c.value(data)
    out[at : at + 4] = np.array([crc], dtype="<u4").view(np.uint8)
    return crc


def _crc_of(chunk: np.ndarray) -> int:
    """The crc32c a stored chunk (payload + checksum) carries."""
    return int(chunk[-4:].view("<u4")[0])


def _check_placed(
    want: np.ndarray | None, shard: int, view: int | None, js, chunk: np.ndarray | None
) -> None:
    """Refuse chunks ``js`` of a shard (``chunk``'s bytes, None where none is stored) unless they are
    the ones its commit recorded (``want``; None: nothing recorded)."""
    if want is None:
        return
    got = NOT_STORED if chunk is None else _crc_of(chunk)
    for j in js:
        if int(want[j]) != got:
            raise ChunkMisplaced(shard, view, j, got, int(want[j]))


def _check_crc(data: np.ndarray, what: str) -> None:
    if data.size < 4 or google_crc32c.value(data[:-4]) != int(data[-4:].view("<u4")[0]):
        raise ChunkError(f"{what}: crc32c mismatch")


def put_row(array: zarr.Array, row: int, values: np.ndarray) -> None:
    """Row ``row`` of a 2-d array chunked by whole rows with the codecs ``[bytes(little), crc32c]``
    (one file a row), written as zarr writes it, even when every value is the fill value."""
    data = np.ascontiguousarray(values, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
    out = np.empty(data.size + 4, dtype=np.uint8)
    out[:-4] = data
    _put_crc(out, data.size, data)
    sync(_chunk_path(array, (row, 0)).set(_PROTOTYPE.buffer.from_array_like(out)))


def get_row(array: zarr.Array, row: int) -> np.ndarray | None:
    """Row ``row`` as :func:`put_row` wrote it; None when it has no file (zarr would read fill values).
    Raises :class:`ChunkError` on a bad checksum or size."""
    raw = sync(_chunk_path(array, (row, 0)).get(_PROTOTYPE))
    if raw is None:
        return None
    data = raw.as_numpy_array()
    _check_crc(data, f"row {row}")
    dtype = array.dtype.newbyteorder("<")
    if data.size - 4 != array.shape[1] * dtype.itemsize:
        raise ChunkError(f"row {row}: {data.size - 4} bytes, {array.shape[1] * dtype.itemsize} expected")
    return data[:-4].view(dtype)


def _chunk_path(array: zarr.Array, coords: tuple[int, ...]):
    return array.store_path / array.metadata.encode_chunk_key(coords)
