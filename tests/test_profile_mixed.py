"""benchmarks/profile_mixed.py needs the device: without one it says so in one line."""

from __future__ import annotations

import pytest
import torch

from splitserve.benchmarks import profile_mixed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_refuses_without_a_gpu(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        profile_mixed.main(["--model", "dummy:tiny", "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "needs a CUDA device" in capsys.readouterr().err
