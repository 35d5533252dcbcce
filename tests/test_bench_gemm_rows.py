"""`benchmarks/gemm_rows.py` on the CPU: the engine's fused layer shapes, one row per M."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitserve.benchmarks.gemm_rows import draw_operands, layer_shapes, main
from splitserve.engine.model.dummy_presets import dummy_arch


def test_llama_8b_layer_shapes_are_the_fused_projections() -> None:
    assert layer_shapes(dummy_arch("dummy:llama-3.1-8b")) == {
        "qkv": (4096, 6144),
        "o": (4096, 4096),
        "gate_up": (4096, 28672),
        "down": (14336, 4096),
    }


def test_smoke_run_writes_one_row_per_count_with_provenance(tmp_path: Path) -> None:
    out = tmp_path / "gemm.json"
    argv = ["--model", "dummy:tiny", "--device", "cpu", "--dtype", "float32", "--smoke"]
    assert main([*argv, "--rows", "4,12", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["rows"] for row in result["rows"]] == [4, 12]
    assert all(
        row["layer_us"] > 0 and set(row["per_gemm_us"]) == set(result["shapes"])
        for row in result["rows"]
    )
    assert {"command", "git_commit", "device", "date"} <= set(result)


def test_operands_alternate_at_each_row_count_and_have_medians(tmp_path: Path) -> None:
    out = tmp_path / "gemm.json"
    argv = ["--model", "dummy:tiny", "--device", "cpu", "--dtype", "float32", "--smoke"]
    argv += ["--rows", "4", "--operands", "normal,uniform", "--repeat", "2", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert [row["operands"] for row in result["rows"]] == ["normal", "uniform"] * 2
    assert set(result["layer_us_median"]["4"]) == {"normal", "uniform"}


def test_operands_are_drawn_as_each_engine_draws_dummy_weights() -> None:
    torch.manual_seed(0)
    x, w = draw_operands("normal", 64, (256, 512), "cpu", torch.float32)
    assert x.shape == (64, 256) and w.shape == (512, 256)
    assert 0.018 < w.std().item() < 0.022 and 0.9 < x.std().item() < 1.1
    x, w = draw_operands("uniform", 64, (256, 512), "cpu", torch.float32)
    assert w.abs().max().item() <= 1e-3 and x.abs().max().item() < 1e-2
    x, w = draw_operands("randn", 64, (256, 512), "cpu", torch.float32)
    assert 0.9 < w.std().item() < 1.1


def test_bad_rows_and_presets_are_errors(capsys) -> None:
    for rows in ("4,x", "0"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--rows", rows, "--device", "cpu"])
        assert exit_info.value.code == 2
    assert main(["--rows", "4", "--device", "cpu", "--operands", "zeros"]) == 2
    assert main(["--rows", "4", "--device", "cpu", "--repeat", "0"]) == 2
    assert main(["--model", "dummy:nope", "--rows", "4", "--device", "cpu", "--smoke"]) == 2
    assert "unknown dummy preset" in capsys.readouterr().err


def test_rows_name_their_library_and_libraries_other_than_torchs_need_cuda(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "gemm.json"
    argv = ["--model", "dummy:tiny", "--device", "cpu", "--dtype", "float32", "--smoke"]
    assert main([*argv, "--rows", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["blas"] for row in result["rows"]] == ["default"]
    assert set(result["layer_us_median"]["4"]) == {"randn"}
    assert main([*argv, "--rows", "4", "--blas", "default,cublaslt"]) == 2
    assert "add --device cuda" in capsys.readouterr().err
    assert main([*argv, "--rows", "4", "--blas", "mkl"]) == 2
    assert "--blas takes one or more of" in capsys.readouterr().err


def test_blas_library_restores_the_library_before_it() -> None:
    from splitserve.benchmarks.gemm_rows import blas_library

    before = torch.backends.cuda.preferred_blas_library()
    with blas_library("cublas"):
        assert torch.backends.cuda.preferred_blas_library() == torch._C._BlasBackend.Cublas
    assert torch.backends.cuda.preferred_blas_library() == before


def test_medians_key_a_library_other_than_the_default_beside_the_operands() -> None:
    from splitserve.benchmarks.gemm_rows import medians

    table = [
        {"rows": 8, "operands": "randn", "blas": blas, "layer_us": us}
        for blas, us in (("default", 1.0), ("cublaslt", 2.0), ("cublaslt", 4.0))
    ]
    assert medians(table) == {"8": {"randn": 1.0, "randn, cublaslt": 3.0}}
