"""The benchmark scripts' shared argument types (benchmarks/arg_types.py)."""

from __future__ import annotations

import argparse

import pytest

from splitserve.benchmarks import split_plan
from splitserve.benchmarks.arg_types import positive_ints


def test_positive_ints_reads_a_comma_separated_list() -> None:
    assert positive_ints("1,2,4") == [1, 2, 4]
    assert positive_ints("8, 16,") == [8, 16]


@pytest.mark.parametrize("text", ["", "0,2", "-1", "2,x", "1.5"])
def test_anything_else_is_an_argument_error(text) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated list of positive"):
        positive_ints(text)


def test_a_script_answers_bad_input_with_a_one_line_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        split_plan.parse_args(["--batches", "4,zero"])
    assert exit_info.value.code == 2
    assert "not a comma-separated list of positive integers" in capsys.readouterr().err
