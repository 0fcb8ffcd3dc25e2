"""The protobuf wire format, parsed by hand: enough to read MindSpore's checkpoint and strategy
files without the ``protobuf`` package, and without copying what is parsed."""

from __future__ import annotations


def varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 70:
        if pos >= end:
            raise ValueError(f"varint cut short at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError(f"varint too long at byte {pos}")


def message(buf, start: int, end: int) -> dict[int, list]:
    """The fields of the protobuf message in ``buf[start:end]``, by number: ints for varints,
    (start, end) spans for length-delimited fields. Nothing is copied."""
    fields, pos = {}, start
    while pos < end:
        key, pos = varint(buf, pos, end)
        wire = key & 7
        if wire == 0:
            value, pos = varint(buf, pos, end)
        elif wire == 2:
            n, pos = varint(buf, pos, end)
            value, pos = (pos, pos + n), pos + n
        elif wire in (1, 5):
            value, pos = pos, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unexpected wire type {wire} at byte {pos}")
        if pos > end:
            raise ValueError(f"field {key >> 3} runs past the end of its message at byte {end}")
        fields.setdefault(key >> 3, []).append(value)
    return fields


def text(buf, span: tuple[int, int]) -> str:
    return bytes(buf[span[0]:span[1]]).decode()


def field(fields: dict, number: int, kind: type, what: str):
    """The (last, as protobuf reads it) value of a singular field, which must be there."""
    value = fields.get(number, [None])[-1]
    if not isinstance(value, kind):
        raise ValueError(f"{what} is missing")
    return value


def integers(buf, values: list, signed: bool = False) -> list[int]:
    """The values of a repeated integer field, whether written packed (a span) or one by one.
    ``signed``: an int32/int64 field, whose negative values are 64-bit two's complement."""
    out = []
    for value in values:
        if isinstance(value, tuple):
            pos, end = value
            while pos < end:
                number, pos = varint(buf, pos, end)
                out.append(number)
        else:
            out.append(value)
    return [v - (1 << 64) if signed and v >= 1 << 63 else v for v in out]
