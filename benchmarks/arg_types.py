"""Argument types the benchmark scripts share (argparse `type=` callables); no imports
beyond the standard library, so that a kernel script takes them without the load
generator's."""

from __future__ import annotations

import argparse


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of positive integers ("1,2,4"), empty items skipped."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of positive integers, e.g. 1,2,4"
        )
    return values
