"""Scanning JSON text that may still be arriving: where a value ends, and the fields of a
call object `{"name": ..., "arguments": ...}` read so far.

The tool parsers (router/tool_parsers/) parse the whole output text again after each new
piece; these scanners tell a complete value from one cut short (`None`: wait for more) and
from text that is not JSON at all (`is_invalid`). They return positions in the text, so a
call's arguments are the model's own characters: a prefix of them while streaming, all of
them at the end, and the streamed pieces add up to exactly the final arguments.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

WHITESPACE = " \t\n\r"
_SCALAR_END = ",}]; \t\n\r<"
_CLOSE = {"{": "}", "[": "]"}
# The rest of a string literal after its opening quote (the text is re-read at every new
# piece, so the scans run in the regex engine, not character by character in Python).
_STRING_CHARS = re.compile(r'(?:[^"\\]|\\.)*', re.DOTALL)
_STRUCTURAL = re.compile(r'[{}\[\]"]')


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


def _string_rest(text: str, i: int) -> tuple[int | None, int]:
    """From text[i], inside a string literal: (the end after its closing quote, or None
    while unfinished; where an unfinished scan resumes)."""
    match = _STRING_CHARS.match(text, i)
    j = match.end() if match is not None else i
    if j < len(text) and text[j] == '"':
        return j + 1, j + 1
    return None, j


def _string_end(text: str, i: int) -> int | None:
    """End (exclusive) of the string literal opening at text[i] == '"'; None: unfinished."""
    return _string_rest(text, i + 1)[0]


class Field(NamedTuple):
    start: int  # first character of the value
    end: int | None  # exclusive; None: the value is still arriving


class ObjectScan(NamedTuple):
    fields: dict[str, Field]
    end: int | None  # exclusive end of the object; None: still arriving
    is_invalid: bool


class JsonScanner:
    """Scans one text that only grows (one choice's output, read again at each piece): an
    object or array still open at the end is resumed where the last scan stopped, so a
    long call costs its new characters, not all of them again. A new text needs a new
    scanner."""

    def __init__(self) -> None:
        # Start of an unfinished container -> (where its scan stopped, the closers owed,
        # whether it stopped inside a string).
        self._resume: dict[int, tuple[int, list[str], bool]] = {}
        self._length = 0

    def value_end(self, text: str, start: int) -> int | None:
        """End (exclusive) of the JSON value at or after `start` (whitespace skipped); None
        while it may still grow; -1 when brackets do not match."""
        if len(text) < self._length:
            self._resume.clear()  # not the text this scanner read before
        self._length = len(text)
        i = skip_ws(text, start)
        if i >= len(text):
            return None
        c = text[i]
        if c == '"':
            return _string_end(text, i)
        if c in _CLOSE:
            return self._container_end(text, i)
        j = i
        while j < len(text) and text[j] not in _SCALAR_END:
            j += 1
        return j if j < len(text) else None

    def _container_end(self, text: str, start: int) -> int | None:
        """End (exclusive) of the object or array opening at text[start]; None: unfinished.
        Only brackets and strings are tracked; json.loads judges the rest once complete."""
        first = (start + 1, [_CLOSE[text[start]]], False)
        i, stack, in_string = self._resume.pop(start, first)
        while True:
            if in_string:
                end, i = _string_rest(text, i)
                if end is None:
                    break
                in_string = False
            found = _STRUCTURAL.search(text, i)
            if found is None:
                i = len(text)
                break
            i, c = found.end(), found.group()
            if c == '"':
                in_string = True
            elif c in _CLOSE:
                stack.append(_CLOSE[c])
            elif c != stack.pop():
                return -1
            elif not stack:
                return i
        self._resume[start] = (i, stack, in_string)
        return None

    def scan_object(self, text: str, start: int) -> ObjectScan:
        """The fields of the object opening at text[start] == '{', as far as they arrived."""
        fields: dict[str, Field] = {}
        i = skip_ws(text, start + 1)
        while True:
            if i >= len(text):
                return ObjectScan(fields, None, False)
            if text[i] == "}":
                return ObjectScan(fields, i + 1, False)
            key, i = _key(text, i)
            if key is None:
                return ObjectScan(fields, None, i < 0)
            value_start = skip_ws(text, i)
            end = self.value_end(text, value_start)
            fields[key] = Field(value_start, end if end is None or end >= 0 else None)
            if end is None or end < 0:
                return ObjectScan(fields, None, end is not None)
            i = skip_ws(text, end)
            if i < len(text) and text[i] == ",":
                i = skip_ws(text, i + 1)
            elif i < len(text) and text[i] != "}":
                return ObjectScan(fields, None, True)


def _key(text: str, i: int) -> tuple[str | None, int]:
    """(key, index after its colon), (None, len) while it arrives, (None, -1) if invalid."""
    if text[i] != '"':
        return None, -1
    end = _string_end(text, i)
    if end is None:
        return None, len(text)
    colon = skip_ws(text, end)
    if colon >= len(text):
        return None, len(text)
    if text[colon] != ":":
        return None, -1
    try:
        return json.loads(text[i:end]), colon + 1
    except json.JSONDecodeError:
        return None, -1
