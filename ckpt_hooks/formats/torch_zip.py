"""The zip container of ``torch.save`` files, laid out before any byte is written.

Every record's size is known from the plan, so its place in the file is too: records can then
be written in any order, by several threads, each straight to its offset (``pwrite``), and the
local headers and the central directory, with real CRC-32s, once the data is in. torch's own
writer streams one record after the other through one thread. The layout is torch's: records
under ``archive/``, data aligned to 64 bytes by an ``FB`` padding field, ZIP64 where sizes or
offsets need it. Pure byte arithmetic: no I/O here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ALIGNMENT = 64
PREFIX = "archive/"
_LIMIT = 0xFFFFFFFF   # a 32-bit field at this value means: see the ZIP64 extra field
_UTF8 = 0x800
_ZIP64_VERSION = 45


@dataclass
class Record:
    name: str        # without the archive prefix
    size: int
    header_offset: int
    data_offset: int
    crc: int = 0


def _zip64_local(size: int) -> bytes:
    return struct.pack("<HHQQ", 1, 16, size, size) if size >= _LIMIT else b""


def layout(sizes: list[tuple[str, int]]) -> tuple[list[Record], int]:
    """Records of these (name, size), in this order, and where the central directory begins."""
    records, at = [], 0
    for name, size in sizes:
        fixed = 30 + len((PREFIX + name).encode()) + len(_zip64_local(size)) + 4
        data = at + fixed + (-(at + fixed)) % ALIGNMENT
        records.append(Record(name, size, at, data))
        at = data + size
    return records, at


def local_header(record: Record) -> bytes:
    """The record's local header with its padding: the bytes from ``header_offset`` to its data."""
    name = (PREFIX + record.name).encode()
    zip64 = _zip64_local(record.size)
    padding = record.data_offset - record.header_offset - 30 - len(name) - len(zip64) - 4
    size = _LIMIT if zip64 else record.size
    return (struct.pack("<IHHHHHIIIHH", 0x04034B50, _ZIP64_VERSION, _UTF8, 0, 0, 0, record.crc, size, size,
                        len(name), len(zip64) + 4 + padding)
            + name + zip64 + struct.pack("<HH", 0x4246, padding) + b"Z" * padding)   # 0x4246: "FB"


def central_directory(records: list[Record], start: int) -> bytes:
    """The central directory, the ZIP64 end records and the end record, written at ``start``."""
    entries = []
    for r in records:
        name = (PREFIX + r.name).encode()
        big = [v for v in (r.size, r.size, r.header_offset) if v >= _LIMIT]
        zip64 = struct.pack(f"<HH{len(big)}Q", 1, 8 * len(big), *big) if big else b""
        entries.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, _ZIP64_VERSION, _ZIP64_VERSION, _UTF8, 0, 0, 0,
                                   r.crc, min(r.size, _LIMIT), min(r.size, _LIMIT), len(name), len(zip64), 0, 0, 0,
                                   0, min(r.header_offset, _LIMIT)) + name + zip64)
    directory = b"".join(entries)
    end64 = start + len(directory)
    count = len(records)
    return (directory
            + struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, _ZIP64_VERSION, _ZIP64_VERSION, 0, 0, count, count,
                          len(directory), start)
            + struct.pack("<IIQI", 0x07064B50, 0, end64, 1)
            + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                          min(len(directory), _LIMIT), min(start, _LIMIT), 0))
