"""scripts/device_smoke.py is run by hand on CUDA and MPS machines; here it runs on the CPU so that it cannot rot."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "device_smoke.py"


def test_smoke_script_passes_on_the_cpu():
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--scale", "2", "--size", "32",
                             "--train-steps", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "9 of 9 checks passed"
    assert sum(line.startswith("ok ") for line in lines) == 9


def test_smoke_script_without_a_device_says_so():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has a device to check")
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "nothing to check" in result.stdout
