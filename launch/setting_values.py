"""One setting's raw value (an environment string or a YAML value) parsed as its flag would
parse it, and where it came from (launch/config_sources.py resolves the precedence).

Rules: the flag's own `type` and `choices`; an on/off flag (`store_true`, `store_false`,
`--x/--no-x`) takes true/false (yes/no, on/off, 1/0), and `no-x: true` is `x` false; a
repeatable flag (`append`, `nargs="+"`) takes a YAML list, or in the environment one value
or a YAML flow list; a whole-number flag refuses 2.5. Every error is one line naming the
flag and the source.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


@dataclass(frozen=True)
class Origin:
    """Where a value came from: 'flag', 'env', 'file' or 'default', and which one."""

    kind: str
    where: str = ""  # the variable name or the file path

    def __str__(self) -> str:
        return f"{self.kind} {self.where}".strip()


def flag_name(key: str) -> str:
    """A file key or flag as the flag's name: `--max_num_seqs` -> `max-num-seqs`."""
    return key.lstrip("-").replace("_", "-").lower()


def primary_name(action: argparse.Action) -> str:
    """The flag name of `action`: its first long option (`stream` of --stream/--no-stream)."""
    return flag_name(next(o for o in action.option_strings if o.startswith("--")))


def _as_bool(raw: Any, origin: str) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError(f"{origin}: expected true or false, got {raw!r}")


def _scalar(action: argparse.Action, raw: Any, origin: str) -> Any:
    convert = action.type
    value: Any
    try:
        if convert is None:  # a string flag: YAML's 123 or true as the text the flag would get
            value = raw if isinstance(raw, str) else json.dumps(raw)
        elif convert in (int, float) and isinstance(raw, int | float) and not isinstance(raw, bool):
            if convert is int and not float(raw).is_integer():
                raise ValueError(f"{raw!r} is not a whole number")
            value = convert(raw)  # type: ignore[operator]
        else:
            value = convert(raw if isinstance(raw, str) else str(raw))  # type: ignore[operator]
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise ValueError(f"{origin}: invalid value {raw!r}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        allowed = ", ".join(str(c) for c in action.choices)
        raise ValueError(f"{origin}: {value!r} is not one of {allowed}")
    return value


def _as_list(raw: Any, is_env: bool) -> list[Any]:
    if isinstance(raw, list):
        return raw
    if is_env and isinstance(raw, str) and raw.strip().startswith("["):
        import yaml

        parsed = yaml.safe_load(raw)
        if isinstance(parsed, list):
            return parsed
    return [raw]


def convert(action: argparse.Action, raw: Any, origin: Origin, name: str = "") -> Any:
    """`raw` (an environment string or a YAML value) as the flag itself would parse it;
    `name`: the flag it was given under (`no-stream: true` is `stream` false)."""
    label = f"--{name or primary_name(action)} from {origin}"
    if isinstance(action, argparse.BooleanOptionalAction):
        is_negative = bool(name) and name != primary_name(action)
        return _as_bool(raw, label) != is_negative
    if isinstance(action, argparse._StoreConstAction):  # store_true / store_false too
        return action.const if _as_bool(raw, label) else action.default
    is_list = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")
    if is_list:
        items = _as_list(raw, origin.kind == "env")
        return [_scalar(action, item, label) for item in items]
    if isinstance(raw, list | dict):
        raise ValueError(f"{label}: expected one value, got {raw!r}")
    return _scalar(action, raw, label)


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping of a --config YAML file (a one-line error when it is not one)."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"--config {path}: not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    return data
