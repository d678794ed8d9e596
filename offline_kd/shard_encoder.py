"""Whole-shard writes without zarr's generic write path, byte-identical to it.

Zarr's ``array[shard] = data`` handles any selection and any codec chain; for the one case
precompute needs (a whole shard at a time, chunked along the sequence axis only, the codec chains of
docs/store-format.md) that generality costs more CPU than the encoding itself: it compares every
chunk with the fill value through a void-dtype ``array_equal`` and copies the data three times
(checksum append, shard concatenation). :class:`ShardEncoder` encodes exactly what zarr would
write (tested byte for byte against it, ``tests/test_store_io.py``):

* inner chunks in order along the sequence axis (zarr's Morton order, which is the linear order
  when only one axis has more than one chunk), each ``bytes(little)`` → optional ``zstd`` →
  ``crc32c`` (4 little-endian bytes appended);
* a chunk whose bytes are all zero (every fill value of the store is 0 / false, compared bitwise
  by zarr) is left out, its index entry ``(2**64 - 1, 2**64 - 1)``;
* the index (``uint64`` offset and length per chunk, ``bytes(little)`` → ``crc32c``) at the end;
* a shard of only empty chunks is not written (an existing file of it is deleted).

The file goes through the array's own zarr store (atomic on local disk, one object on fsspec), so
partial-file cleanup, object stores and reading are unchanged. An array with any other layout
(another codec, a non-zero fill value, chunks along other axes) returns ``None`` from
:meth:`ShardEncoder.for_array` and is written by zarr as before.
"""

from __future__ import annotations

import google_crc32c
import numpy as np
import zarr
import zarr.codecs as zc
from numcodecs.zstd import Zstd
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

_EMPTY = np.iinfo(np.uint64).max  # index entry of a chunk that is not stored


class ShardEncoder:
    """Encodes and writes whole shards of one zarr array (see the module docstring)."""

    def __init__(self, array: zarr.Array, seq_axis: int, zstd: Zstd | None) -> None:
        self.array = array
        self.seq_axis = seq_axis
        self.zstd = zstd
        self.chunk_rows = array.metadata.codecs[0].chunk_shape[seq_axis]
        self.shard_rows = array.shards[seq_axis]
        self.row_shape = tuple(array.shape[seq_axis + 1 :])
        self.dtype = array.dtype

    @classmethod
    def for_array(cls, array: zarr.Array, seq_axis: int) -> ShardEncoder | None:
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
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        n, c = rows.shape[0], self.chunk_rows
        flat = rows.reshape(n, -1).view(np.uint8)
        n_chunks = self.shard_rows // c
        row_bytes = flat.shape[1]
        pieces: list = []
        index = np.full((n_chunks, 2), _EMPTY, dtype="<u8")
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
            return None
        out = np.empty(offset + index.nbytes + 4, dtype=np.uint8)
        pos = 0
        for data in pieces:
            out[pos : pos + data.size] = data
            _put_crc(out, pos + data.size, data)
            pos += data.size + 4
        out[pos : pos + index.nbytes] = index.reshape(-1).view(np.uint8)
        _put_crc(out, pos + index.nbytes, out[pos : pos + index.nbytes])
        return out

    def write(self, shard: int, rows: np.ndarray, view: int | None = None) -> None:
        """Encode ``rows`` as shard ``shard`` (of ``view`` for a per-view array) and store the file."""
        coords = ((view,) if view is not None else ()) + (shard,) + (0,) * len(self.row_shape)
        key = self.array.metadata.encode_chunk_key(coords)
        path = self.array.store_path / key
        out = self.encode(rows)
        if out is None:
            sync(path.delete())
        else:
            sync(path.set(default_buffer_prototype().buffer.from_array_like(out)))


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


def _put_crc(out: np.ndarray, at: int, data: np.ndarray) -> None:
    out[at : at + 4] = np.array([google_crc32c.value(data)], dtype="<u4").view(np.uint8)
