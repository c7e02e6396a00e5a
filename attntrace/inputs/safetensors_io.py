"""A lazy safetensors reader of our own: one header parse and one memory map per file.

The format: an 8-byte little-endian u64 ``n``, then ``n`` bytes of UTF-8 JSON
``{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}``,
then the raw little-endian tensor bytes; offsets count from the end of the header.

Opening a file reads and validates the header (length sane, JSON valid, every entry
well-formed, offsets inside the file and equal to shape × itemsize, no overlaps) and
maps the file once.  :meth:`SafetensorsFile.read` then touches only the bytes of the
tensor asked for: when no conversion is needed the result is a read-only view onto
the map (pages are read when used), so a gather from a 47 MB embedding table reads a
few rows.  bfloat16 becomes float32 exactly (the 16 bits are the high half of a
float32).  A sharded checkpoint (``model.safetensors.index.json``) opens each shard
the first time one of its tensors is needed, and only once.

Every corruption is an :class:`~attntrace.errors.InputError` naming the file and tensor.
Codes: ATT-E300..E313 (see the table in :data:`ERROR_CODES`).
"""
from __future__ import annotations

import difflib
import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from attntrace.errors import Diagnosis, InputError

ERROR_CODES = {
    "ATT-E300": "safetensors file missing or unreadable",
    "ATT-E301": "safetensors file shorter than its 8-byte header length",
    "ATT-E302": "safetensors header length impossible (zero, over 100 MB, or past the end of the file)",
    "ATT-E303": "safetensors header is not a UTF-8 JSON object (or repeats a key)",
    "ATT-E304": "safetensors header entry malformed (dtype/shape/data_offsets/__metadata__)",
    "ATT-E305": "tensor dtype not supported",
    "ATT-E306": "tensor offsets disagree with shape × itemsize",
    "ATT-E307": "tensor bytes lie past the end of the file (truncated file)",
    "ATT-E308": "two tensors' bytes overlap",
    "ATT-E309": "tensor name not in the checkpoint, or rows out of range",
    "ATT-E310": "sharded index (model.safetensors.index.json) malformed",
    "ATT-E311": "a shard named by the index is missing",
    "ATT-E312": "a tensor the index places in a shard is not in that shard",
    "ATT-E313": "requested dtype not one of float32, float64, None",
}

MAX_HEADER_BYTES = 100_000_000          # the limit the reference implementation enforces

# safetensors dtype -> numpy dtype of the stored bytes (little-endian); BF16 is read as raw uint16
STORED_DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
TARGET_DTYPES = ("float32", "float64")


def _error(code: str, message: str, *, file: Union[str, Path], tensor: Optional[str] = None,
           hint: Optional[str] = None, details: Iterable[str] = ()) -> InputError:
    where = [f"file: {file}"] + ([f"tensor: {tensor}"] if tensor else [])
    return InputError(Diagnosis(code=code, message=message, hint=hint, details=where + list(details)))


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry: stored dtype name, shape, absolute byte range, file."""

    name: str
    dtype: str                  # the safetensors name: "F32", "BF16", ...
    shape: Tuple[int, ...]
    begin: int                  # absolute offsets in the file
    end: int
    file: Path

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def _check_target(dtype: Optional[str], file: Path, name: str) -> None:
    if dtype is not None and dtype not in TARGET_DTYPES:
        raise _error("ATT-E313", f"cannot read tensor '{name}' as {dtype!r}", file=file, tensor=name,
                     hint="ask for float32, float64, or None (the stored dtype; bfloat16 gives float32)")


def convert(raw: np.ndarray, stored: str, dtype: Optional[str]) -> np.ndarray:
    """Stored bytes (viewed with :data:`STORED_DTYPES`) to the requested numpy dtype.

    ``dtype=None`` keeps the stored dtype, except bfloat16 which numpy lacks: float32.
    No copy when nothing changes; bfloat16 -> float32 is exact (the uint16 becomes the
    high half of a uint32).
    """
    if stored == "BF16":
        raw = (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if dtype is None or raw.dtype == np.dtype(dtype):
        return raw
    return raw.astype(dtype)


class SafetensorsFile:
    """One .safetensors file: header parsed and validated on open, tensors read on demand."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self._map = self._open_map()
        self.metadata, self._infos = self._parse_header()

    # ------------------------------------------------------------------ opening

    def _open_map(self) -> mmap.mmap | bytes:
        try:
            with open(self.path, "rb") as handle:       # the only open() of this file
                size = self.path.stat().st_size
                if size < 8:
                    raise _error("ATT-E301", f"{self.path.name} is {size} bytes: too short for a safetensors "
                                 "file (8-byte header length, JSON header, data)", file=self.path,
                                 hint="the file is truncated or not a safetensors file")
                return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise _error("ATT-E300", f"cannot read {self.path.name}: {exc.strerror or exc}", file=self.path,
                         hint="check the path and its permissions") from None

    def _parse_header(self) -> Tuple[Dict[str, str], Dict[str, TensorInfo]]:
        size = len(self._map)
        (length,) = struct.unpack("<Q", self._map[:8])
        if length == 0 or length > MAX_HEADER_BYTES or 8 + length > size:
            raise _error("ATT-E302", f"{self.path.name}: header length {length} bytes is impossible for a "
                         f"{size}-byte file", file=self.path,
                         details=[f"allowed: 1 .. min({MAX_HEADER_BYTES}, file size - 8 = {size - 8})"],
                         hint="the file is truncated or not a safetensors file")
        header = self._load_json(bytes(self._map[8:8 + length]))
        metadata = self._metadata(header.pop("__metadata__", {}))
        data_start = 8 + length
        infos = {name: self._entry(name, entry, data_start, size) for name, entry in header.items()}
        self._check_overlaps(infos)
        return metadata, infos

    def _load_json(self, raw: bytes) -> dict:
        def no_duplicates(pairs):
            keys = [k for k, _ in pairs]
            repeated = sorted({k for k in keys if keys.count(k) > 1})
            if repeated:
                raise ValueError(f"key {repeated[0]!r} appears twice")
            return dict(pairs)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _error("ATT-E303", f"{self.path.name}: the header is not valid JSON ({exc})", file=self.path,
                         hint="the file is corrupt or not a safetensors file") from None
        if not isinstance(header, dict):
            raise _error("ATT-E303", f"{self.path.name}: the header is a JSON {type(header).__name__}, "
                         "not an object", file=self.path)
        return header

    def _metadata(self, metadata) -> Dict[str, str]:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _error("ATT-E304", f"{self.path.name}: __metadata__ must map strings to strings",
                         file=self.path, tensor="__metadata__")
        return metadata

    def _entry(self, name: str, entry, data_start: int, size: int) -> TensorInfo:
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise _error("ATT-E304", f"{self.path.name}: entry '{name}' needs dtype, shape and data_offsets",
                         file=self.path, tensor=name, details=[f"entry: {str(entry)[:200]}"])
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not _is_int_list(shape) or any(s < 0 for s in shape):
            raise _error("ATT-E304", f"{self.path.name}: shape of '{name}' is {shape!r}, not a list of "
                         "non-negative integers", file=self.path, tensor=name)
        if not _is_int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
            raise _error("ATT-E304", f"{self.path.name}: data_offsets of '{name}' is {offsets!r}, not "
                         "[begin, end] with 0 <= begin <= end", file=self.path, tensor=name)
        if dtype not in STORED_DTYPES:
            raise _error("ATT-E305", f"{self.path.name}: tensor '{name}' has dtype {dtype!r}, which attntrace "
                         "does not read", file=self.path, tensor=name,
                         details=["supported: " + ", ".join(STORED_DTYPES)],
                         hint="convert the checkpoint to float32/float16/bfloat16 (quantized formats are not read)")
        nbytes = int(np.prod(shape, dtype=np.int64)) * STORED_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise _error("ATT-E306", f"{self.path.name}: tensor '{name}' spans {offsets[1] - offsets[0]} bytes "
                         f"but {dtype} {list(shape)} needs {nbytes}", file=self.path, tensor=name,
                         details=[f"data_offsets {offsets}"], hint="the header is corrupt")
        begin, end = data_start + offsets[0], data_start + offsets[1]
        if end > size:
            raise _error("ATT-E307", f"{self.path.name}: tensor '{name}' ends at byte {end} but the file has "
                         f"{size} bytes", file=self.path, tensor=name,
                         hint="the file is truncated: download or copy it again")
        return TensorInfo(name, dtype, tuple(shape), begin, end, self.path)

    def _check_overlaps(self, infos: Dict[str, TensorInfo]) -> None:
        spans = sorted((i for i in infos.values() if i.end > i.begin), key=lambda i: (i.begin, i.end))
        for before, after in zip(spans, spans[1:]):
            if after.begin < before.end:
                raise _error("ATT-E308", f"{self.path.name}: tensors '{before.name}' and '{after.name}' overlap "
                             f"(bytes {after.begin}..{min(before.end, after.end)})", file=self.path,
                             tensor=after.name, hint="the header is corrupt")

    # ------------------------------------------------------------------ reading

    def names(self) -> List[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise _missing(name, self._infos, self.path) from None

    def _raw(self, info: TensorInfo) -> np.ndarray:
        return np.frombuffer(self._map, dtype=STORED_DTYPES[info.dtype], count=info.numel,
                             offset=info.begin).reshape(info.shape)

    def read(self, name: str, dtype: Optional[str] = None) -> np.ndarray:
        """One tensor as ``dtype`` (float32/float64, or None for the stored one).

        Without conversion the result is a read-only view onto the mapped file.
        """
        info = self.info(name)
        _check_target(dtype, self.path, name)
        return convert(self._raw(info), info.dtype, dtype)

    def read_rows(self, name: str, rows, dtype: Optional[str] = None) -> np.ndarray:
        """``tensor[rows]`` (rows index the first axis) reading only those rows' bytes."""
        info = self.info(name)
        _check_target(dtype, self.path, name)
        rows = np.asarray(rows)
        if not info.shape or rows.size and (rows.min() < 0 or rows.max() >= info.shape[0]):
            raise _error("ATT-E309", f"rows out of range for '{name}' of shape {list(info.shape)}",
                         file=self.path, tensor=name,
                         details=[f"asked for rows {int(rows.min())}..{int(rows.max())}"] if rows.size else [])
        return convert(self._raw(info)[rows], info.dtype, dtype)


def _is_int_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _missing(name: str, known, file: Path) -> InputError:
    close = difflib.get_close_matches(name, list(known), n=3)
    return _error("ATT-E309", f"no tensor '{name}' in {file.name}", file=file, tensor=name,
                  hint=f"did you mean {', '.join(repr(c) for c in close)}?" if close else None,
                  details=[f"{len(known)} tensors in the checkpoint"])


class ShardedSafetensors:
    """A checkpoint split over shards by ``model.safetensors.index.json`` (its ``weight_map``)."""

    def __init__(self, index_path: Union[str, Path]):
        self.path = Path(index_path)
        self.weight_map = self._read_index()
        self.metadata: Dict[str, str] = {}
        self._shards: Dict[str, SafetensorsFile] = {}
        self._check_shards_exist()

    def _read_index(self) -> Dict[str, str]:
        try:
            index = json.loads(self.path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise _error("ATT-E300", f"cannot read {self.path.name}: {exc.strerror or exc}", file=self.path) from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise _error("ATT-E310", f"{self.path.name} is not valid JSON ({exc})", file=self.path) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise _error("ATT-E310", f"{self.path.name} needs a \"weight_map\" object mapping tensor names "
                         "to shard file names", file=self.path)
        for name, shard in weight_map.items():
            if Path(shard).is_absolute() or ".." in Path(shard).parts or Path(shard).name != shard:
                raise _error("ATT-E310", f"{self.path.name}: shard {shard!r} of '{name}' is not a file name "
                             "beside the index", file=self.path, tensor=name)
        return weight_map

    def _check_shards_exist(self) -> None:
        by_shard: Dict[str, List[str]] = {}
        for name, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            if not (self.path.parent / shard).is_file():
                raise _error("ATT-E311", f"shard {shard} is missing (the index places {len(names)} tensors in it)",
                             file=self.path.parent / shard, tensor=names[0],
                             details=[f"index: {self.path}"], hint="download every shard the index names")

    def _shard(self, name: str) -> SafetensorsFile:
        try:
            shard = self.weight_map[name]
        except KeyError:
            raise _missing(name, self.weight_map, self.path) from None
        if shard not in self._shards:
            self._shards[shard] = SafetensorsFile(self.path.parent / shard)
            self.metadata.update(self._shards[shard].metadata)
        opened = self._shards[shard]
        if name not in opened:
            raise _error("ATT-E312", f"the index places '{name}' in {shard}, but that shard has no such tensor",
                         file=opened.path, tensor=name, details=[f"index: {self.path}"])
        return opened

    def names(self) -> List[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def info(self, name: str) -> TensorInfo:
        return self._shard(name).info(name)

    def read(self, name: str, dtype: Optional[str] = None) -> np.ndarray:
        return self._shard(name).read(name, dtype)

    def read_rows(self, name: str, rows, dtype: Optional[str] = None) -> np.ndarray:
        return self._shard(name).read_rows(name, rows, dtype)

    @property
    def files_opened(self) -> List[Path]:
        return [s.path for s in self._shards.values()]


TensorStore = Union[SafetensorsFile, ShardedSafetensors]


def open_tensors(path: Union[str, Path]) -> TensorStore:
    """A ``.safetensors`` file, or a sharded checkpoint from its ``*.index.json``."""
    path = Path(path)
    return ShardedSafetensors(path) if path.name.endswith(".json") else SafetensorsFile(path)


# --------------------------------------------------------------------------- writing

_WRITTEN_CODES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                  np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.bool_): "BOOL"}


def safetensors_bytes(tensors: Dict[str, np.ndarray], metadata: Optional[Dict[str, str]] = None):
    """The header and the tensors of a .safetensors file, in order (write them one after another).

    Little-endian, C order, offsets as the format wants them; the header is padded with spaces
    to a multiple of 8 bytes (as the reference writer does)."""
    header: Dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset, arrays = 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array)
        if data.dtype not in _WRITTEN_CODES:
            data = data.astype(np.float64)
        data = data.astype(data.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _WRITTEN_CODES[data.dtype.newbyteorder("=")], "shape": list(data.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
        arrays.append(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    yield struct.pack("<Q", len(text)) + text
    for data in arrays:
        yield data.tobytes()
