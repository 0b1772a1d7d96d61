"""tools/gpu_check.py, the GPU acceptance script, runs its every check on this CPU with tiny sizes (as CI can),
writes them as JSON, and exits non-zero when one fails."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

from tools import gpu_check

CHECKS = {"train_tiny", "cache_fp32", "cache_bf16", "loss_grad_bf16", "beam_decode", "learns"}


@pytest.mark.slow
def test_every_check_passes_on_cpu_with_tiny_sizes(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, "-m", "tools.gpu_check", "--device", "cpu", "--tiny", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert {c["check"] for c in result["checks"]} == CHECKS
    assert all(c["passed"] for c in result["checks"]), result["checks"]
    assert "| cache_bf16 | yes |" in done.stdout  # the table


def test_a_failed_check_makes_the_exit_status_non_zero(tmp_path, monkeypatch):
    row = {"check": "cache_fp32", "passed": False, "measured": "x", "criterion": "y", "peak_flops": 1e9}
    monkeypatch.setattr(gpu_check, "run_checks", lambda size, device: [row])
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "r.json")])
    assert e.value.code == 1
    assert json.loads((tmp_path / "r.json").read_text())["checks"][0]["passed"] is False


def test_no_gpu_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU visible to torch; use --device cpu --tiny"):
        gpu_check.main([])


def test_it_needs_only_torch_numpy_and_the_library():
    # A bare GPU box has torch and numpy: the script must not pull in the pipeline's other dependencies.
    forbidden = ("ray", "mlflow", "dvc", "sentencepiece", "datasets", "yaml", "pydantic", "pipeline", "sacrebleu")
    program = (
        f"import sys, tools.gpu_check; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({forbidden!r})))"
    )
    out = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
