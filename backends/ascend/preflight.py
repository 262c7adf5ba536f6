"""Fail early, and say why, when this machine cannot run vLLM on Ascend NPUs."""
from __future__ import annotations

import importlib.util
import subprocess
import sys


class AscendUnavailable(RuntimeError):
    """torch_npu, vllm_ascend or the NPUs themselves are missing here."""


_PACKAGES = (
    ("torch_npu", "torch-npu (Ascend's PyTorch adapter, matching the installed torch; needs the CANN toolkit)"),
    ("vllm", "vllm (the version vllm-ascend is released for)"),
    ("vllm_ascend", "vllm-ascend (the vLLM hardware plugin for Ascend)"),
)


def missing_packages() -> list[str]:
    """Install hints for the Ascend stack's packages that cannot be imported here (nothing is imported)."""
    return [hint for module, hint in _PACKAGES if importlib.util.find_spec(module) is None]


def npu_count(python: str = sys.executable, timeout_s: float = 120.0) -> int:
    """NPUs torch_npu sees, asked in a child process so this one never holds an NPU context."""
    probe = "import torch, torch_npu; print(torch.npu.device_count() if torch.npu.is_available() else 0)"
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AscendUnavailable(f"backend=ascend: probing the NPUs took over {timeout_s:.0f} s") from None
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-5:])
        raise AscendUnavailable(f"backend=ascend: torch_npu failed to load (is CANN's set_env.sh sourced?):\n{tail}")
    return int(out.stdout.strip().splitlines()[-1])


def check_ascend(devices_needed: int, python: str = sys.executable) -> int:
    """Raise AscendUnavailable naming what is missing; return the NPU count when this node can run the launch."""
    missing = missing_packages()
    if missing:
        raise AscendUnavailable("backend=ascend needs the Ascend software stack, missing here: " + "; ".join(missing)
                                + ". Use backend=vllm (CPU/CUDA), backend=emulator or backend=sim on other machines.")
    count = npu_count(python)
    if count < devices_needed:
        raise AscendUnavailable(f"backend=ascend: this node's launch needs {devices_needed} NPU(s), torch_npu sees "
                                f"{count} (check ASCEND_RT_VISIBLE_DEVICES and npu-smi info)")
    return count
