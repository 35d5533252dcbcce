"""Notification tags: which request and which chunk a KV push belongs to.

The prefill node encodes a tag for every chunk push (`encode_tag`); NIXL delivers it to
the decode node as the push's notification once the bytes have landed; the decode node's
`ArrivalTracker` decodes it (`decode_tag`) to count the request's chunks.

Format (UTF-8 on the wire): ``"{request_id}|{chunk_idx}|{is_last}"`` where `chunk_idx`
counts from 0 in decimal and `is_last` is ``1`` on the request's final chunk, else ``0``.
A request id may hold any character except the separator ``|`` and must not be empty.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from splitserve.engine.request import RequestId

TAG_SEPARATOR = "|"
_INDEX_RE = re.compile(r"0|[1-9][0-9]*")


class ChunkTag(NamedTuple):
    request_id: RequestId
    chunk_idx: int
    is_last: bool


def validate_request_id(request_id: str) -> RequestId:
    """Return `request_id` as a RequestId, or raise if a tag cannot carry it."""
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request id must be a non-empty str, got {request_id!r}")
    if TAG_SEPARATOR in request_id:
        raise ValueError(
            f"request id {request_id!r} contains {TAG_SEPARATOR!r}, which separates the fields "
            "of a KV transfer tag; choose ids without it"
        )
    return RequestId(request_id)


def encode_tag(request_id: str, chunk_idx: int, is_last: bool) -> str:
    """The notification tag of chunk `chunk_idx` of `request_id`."""
    validate_request_id(request_id)
    if isinstance(chunk_idx, bool) or not isinstance(chunk_idx, int) or chunk_idx < 0:
        raise ValueError(f"chunk_idx must be an int >= 0, got {chunk_idx!r}")
    return f"{request_id}{TAG_SEPARATOR}{chunk_idx}{TAG_SEPARATOR}{int(bool(is_last))}"


def decode_tag(tag: str) -> ChunkTag:
    """Parse a tag made by `encode_tag`; ValueError names what is wrong with it."""
    parts = tag.split(TAG_SEPARATOR)
    if len(parts) != 3:
        raise ValueError(
            f"KV transfer tag {tag!r} must have 3 fields separated by {TAG_SEPARATOR!r} "
            "(request_id|chunk_idx|is_last); build it with encode_tag()"
        )
    request_id, index, last = parts
    if not request_id:
        raise ValueError(f"KV transfer tag {tag!r} has an empty request id")
    if not _INDEX_RE.fullmatch(index):
        raise ValueError(f"KV transfer tag {tag!r}: chunk index {index!r} is not a decimal int")
    if last not in ("0", "1"):
        raise ValueError(f"KV transfer tag {tag!r}: final-chunk flag {last!r} must be 0 or 1")
    return ChunkTag(RequestId(request_id), int(index), last == "1")
