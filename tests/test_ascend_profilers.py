"""The profilers' Ascend paths, tested up to the launch (torch_npu and vllm-ascend cannot run here): what the engine is
started with, and a clear refusal, before any model is built, where the Ascend stack is missing."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cost_calibration  # noqa: E402

no_ascend = pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_ascend_engine_is_vllm_ascend_on_one_npu_in_eager_mode_without_the_cpu_settings(tmp_path):
    env, llm = cost_calibration.engine_setup("ascend", tmp_path / "model", tmp_path)
    assert env["ASCEND_RT_VISIBLE_DEVICES"] == "0" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert not any(k.startswith("VLLM_CPU_") for k in env) and "OMP_NUM_THREADS" not in env
    assert llm["enforce_eager"] and not llm["enable_prefix_caching"] and 0 < llm["gpu_memory_utilization"] < 1
    cpu_env, cpu_llm = cost_calibration.engine_setup("cpu", tmp_path / "model", tmp_path)
    assert cpu_env["OMP_NUM_THREADS"] == "1" and cpu_env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    # the same steps are timed on both: only the platform's own settings differ
    assert {k: v for k, v in llm.items() if k != "gpu_memory_utilization"} == cpu_llm
    with pytest.raises(ValueError, match="--platform"):
        cost_calibration.engine_setup("tpu", tmp_path, tmp_path)


@no_ascend
def test_cost_calibration_on_ascend_names_what_is_missing_before_building_anything():
    out = run("benchmarks/cost_calibration.py", "--platform", "ascend", "--hardware", "ascend_910b", "--model",
              "llama_300m")
    assert out.returncode != 0
    assert "--platform ascend needs the Ascend software stack" in out.stderr and "torch-npu" in out.stderr
    assert "Traceback" not in out.stderr


def test_cost_calibration_on_ascend_needs_the_hardware_it_is_for():
    out = run("benchmarks/cost_calibration.py", "--platform", "ascend")
    assert out.returncode == 2 and "--hardware" in out.stderr
    out = run("benchmarks/cost_calibration.py", "--hardware", "no_such_npu")
    assert out.returncode == 2 and "conf/hardware/no_such_npu.yaml" in out.stderr


@no_ascend
def test_operator_profile_on_npu_names_torch_npu():
    out = run("benchmarks/operator_profile.py", "--model", "tiny_llama", "--hardware", "ascend_910b", "--device",
              "npu", "--quick")
    assert out.returncode == 2 and "--device npu needs torch_npu" in out.stderr
    assert "Traceback" not in out.stderr
