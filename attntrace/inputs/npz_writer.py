""".npz archives written array by array, as fast as the disk takes them.

A trace's export writes gigabytes of score-sized arrays while the run waits (render/export.py):
:mod:`zipfile` would compute each member's CRC-32 and then write it, one after the other.  Here
the CRC of an array runs on a second thread while the main thread writes the same bytes (zlib and
the file write both release the GIL), so an export costs its write alone: 815 MB of a 2,048-token
trace took 0.73 s to write and 0.34 s more to checksum through zipfile on this machine.

The archive is what ``np.savez`` writes -- stored (uncompressed) members ``NAME.npy`` in .npy
format 1.0 (2.0 for huge headers), with zip64 sizes and offsets so a member or the archive may pass
4 GiB -- so ``np.load(path, allow_pickle=False)`` and :mod:`zipfile` read it.  Members must be
numbers, booleans or text (no pickle).
"""
from __future__ import annotations

import io
import struct
import time
import zlib
from typing import BinaryIO, Iterator, List, Tuple

import numpy as np

SLICE_BYTES = 1 << 22                  # written and checksummed a slice at a time
ZIP64_VERSION = 45                      # "version needed to extract": zip64
UNIX = 3
MAX32 = 0xFFFFFFFF
LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")           # zipfile.structFileHeader
CENTRAL_HEADER = struct.Struct("<4s4B4HL2L5H2L")       # zipfile.structCentralDir
END64 = struct.Struct("<4sQ2H2L4Q")                     # zip64 end of central directory record
END64_LOCATOR = struct.Struct("<4sLQL")
END = struct.Struct("<4s4H2LH")
_CRC_THREAD = None


def npy_header(array: np.ndarray) -> bytes:
    """The .npy header of `array`, written in C order."""
    from numpy.lib import format as npy
    header = dict(npy.header_data_from_array_1_0(array), fortran_order=False)
    stream = io.BytesIO()
    if len(repr(header)) < 65000:
        npy.write_array_header_1_0(stream, header)
    else:                                               # a header this long needs format 2.0
        npy.write_array_header_2_0(stream, header)
    return stream.getvalue()


def array_slices(array: np.ndarray) -> Iterator[memoryview]:
    """The bytes of `array` in C order, a slice at a time, with no copy of the whole array."""
    if array.flags.c_contiguous and array.dtype.kind in "biuf" and array.size:
        flat = array.reshape(-1)
        step = max(1, SLICE_BYTES // flat.itemsize)
        for start in range(0, flat.size, step):
            yield memoryview(flat[start:start + step]).cast("B")
        return
    for chunk in np.nditer(array, flags=["external_loop", "buffered", "zerosize_ok"], order="C",
                           buffersize=max(1, SLICE_BYTES // max(1, array.itemsize))):
        yield memoryview(chunk.tobytes("C"))


def _dos_time() -> Tuple[int, int]:
    t = time.localtime()
    return (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2), \
        ((max(t.tm_year, 1980) - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday


def _crc_of(parts: List[memoryview]) -> int:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


class NpzWriter:
    """Members added one at a time to an open, seekable binary file; :meth:`close` writes the
    central directory (the stream stays open: its owner closes it)."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.members: List[Tuple[bytes, int, int, int]] = []      # (name, header offset, size, CRC)
        self.time, self.date = _dos_time()

    def add(self, name: str, array: np.ndarray) -> None:
        """`array` as member ``name.npy``."""
        global _CRC_THREAD
        array = np.asanyarray(array)
        if array.dtype.hasobject:
            raise ValueError(f"{name}: an array of Python objects cannot be saved without pickle")
        filename = (name + ".npy").encode("utf-8")
        header = npy_header(array)
        size = len(header) + array.nbytes
        offset = self.stream.tell()
        extra = struct.pack("<HHQQ", 1, 16, size, size)          # zip64: original and stored size
        self.stream.write(LOCAL_HEADER.pack(b"PK\003\004", ZIP64_VERSION, 0, 0x800, 0, self.time, self.date,
                                            0, MAX32, MAX32, len(filename), len(extra)) + filename + extra)
        parts = [memoryview(header)] + list(array_slices(array)) if array.flags.c_contiguous else None
        if parts is not None and array.nbytes >= 2 * SLICE_BYTES:
            if _CRC_THREAD is None:
                from concurrent.futures import ThreadPoolExecutor
                _CRC_THREAD = ThreadPoolExecutor(1, thread_name_prefix="attntrace-crc")
            crc_done = _CRC_THREAD.submit(_crc_of, parts)      # the checksum beside the writes
            try:
                for part in parts:
                    self.stream.write(part)
            finally:
                crc = crc_done.result()
        else:
            crc = zlib.crc32(header)
            self.stream.write(header)
            for part in parts[1:] if parts is not None else array_slices(array):
                crc = zlib.crc32(part, crc)
                self.stream.write(part)
        end = self.stream.tell()
        self.stream.seek(offset + 14)                            # the local header's CRC-32 field
        self.stream.write(struct.pack("<L", crc))
        self.stream.seek(end)
        self.members.append((filename, offset, size, crc))

    def close(self) -> None:
        """The central directory and the zip64 end records."""
        start = self.stream.tell()
        for filename, offset, size, crc in self.members:
            extra = struct.pack("<HHQQQ", 1, 24, size, size, offset)
            self.stream.write(CENTRAL_HEADER.pack(
                b"PK\001\002", ZIP64_VERSION, UNIX, ZIP64_VERSION, 0, 0x800, 0, self.time, self.date, crc,
                MAX32, MAX32, len(filename), len(extra), 0, 0, 0, (0o100644 << 16), MAX32) + filename + extra)
        end = self.stream.tell()
        count = len(self.members)
        self.stream.write(END64.pack(b"PK\006\006", END64.size - 12, ZIP64_VERSION, ZIP64_VERSION, 0, 0,
                                     count, count, end - start, start))
        self.stream.write(END64_LOCATOR.pack(b"PK\006\007", 0, end, 1))
        self.stream.write(END.pack(b"PK\005\006", 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                                   min(end - start, MAX32), min(start, MAX32), 0))
