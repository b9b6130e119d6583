"""promptvault doctor: a real report from this machine, and the OpenBLAS hint when it applies."""

import json
import os
import subprocess
import sys

import mlx.core as mx
from click.testing import CliRunner

from promptvault.cli.doctor import doctor
from promptvault.doctor import blas_hint, run_doctor
from promptvault.models.cache_dir import dir_size_bytes, models_cache_dir

DOCTOR_JSON = "from click.testing import CliRunner\nfrom promptvault.cli.doctor import doctor\nprint(CliRunner().invoke(doctor, ['--json']).output)"


def test_report_describes_this_machine(model_cache_dir):
    report = run_doctor()
    assert report["mlx"] == mx.__version__
    assert report["default_device"] == str(mx.default_device())
    assert report["matmul_fp32_gflops"] > 0
    assert report["model_cache"]["path"] == str(models_cache_dir()) == model_cache_dir
    assert report["model_cache"]["bytes"] == dir_size_bytes(models_cache_dir())
    assert set(report["test_models"].values()) == {"installed"}
    json.dumps(report)


def test_hint_only_for_slow_linux_cpu_without_openblas():
    hint = blas_hint("Linux", on_cpu=True, has_openblas=False, gflops=5.0)
    assert "sudo apt-get install libopenblas0-pthread" in hint and "LD_PRELOAD=/usr/lib/" in hint
    assert blas_hint("Linux", on_cpu=True, has_openblas=True, gflops=5.0) is None
    assert blas_hint("Darwin", on_cpu=True, has_openblas=False, gflops=5.0) is None
    assert blas_hint("Linux", on_cpu=False, has_openblas=False, gflops=5.0) is None


def _doctor_in_subprocess(preload: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    run = subprocess.run([sys.executable, "-c", DOCTOR_JSON], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_cli_json_without_and_with_openblas():
    """Real processes: the reference BLAS gets the fix-it hint; preloaded OpenBLAS is detected."""
    from promptvault.doctor import openblas_path

    slow = _doctor_in_subprocess(None)
    assert slow["openblas_loaded"] is False
    assert len(slow["hints"]) == 1 and "LD_PRELOAD=" in slow["hints"][0]
    fast = _doctor_in_subprocess(openblas_path())
    assert fast["openblas_loaded"] is True and fast["hints"] == []


def test_cli_text_output():
    result = CliRunner().invoke(doctor, [])
    assert result.exit_code == 0
    assert "fp32 matmul:" in result.output and "model cache:" in result.output
