"""Vidur's published operator profiles (microsoft/vidur, ``data/profiling/compute/<gpu>/<org>/<model>/``) as rows of
``operator_profile.py``'s table, so the roofline is checked against kernel times measured by others on hardware this
project has no access to. Nothing of Vidur's is copied here: the user points ``operator_profile.py --vidur DIR`` at
a Vidur checkout's model folder.

- ``mlp.csv`` (required): every non-attention operator of one decoder layer on one of ``num_tensor_parallel_workers``
  devices, timed by CUDA events in milliseconds per ``num_tokens``. Its four GEMMs become ``gemm`` rows (qkv, o,
  gate_up, down), and the whole layer without attention (the GEMMs, norms, rope, activation and residual add) a
  ``layer_dense`` row priced by ``RooflineModel.breakdown`` itself: the dense GEMMs and elementwise traffic per
  layer, and the per-kernel cost of the nine kernels the row times (the cost model's per-step fixed cost also
  counts attention, the KV write and the per-step kernels, which are not in this table); its five small kernels
  (two norms, rope, activation, residual add) an ``elementwise`` row priced as the cost model charges them: their
  activation traffic (``activation_bytes_per_token``) at the elementwise HBM fraction and a per-kernel cost each.
- ``attention.csv`` (optional; in Vidur's repository a Git LFS file): ``prefill_attention`` rows (one sequence,
  ``prefill_chunk_size`` new tokens after ``kv_cache_size`` cached ones) and ``decode_attention`` rows
  (``batch_size`` sequences of ``kv_cache_size`` tokens), the attention kernel alone.

Rows are kept at power-of-two token counts, batches and contexts (Vidur's tables are dense; the errors are the same
and the table stays readable).
"""
from __future__ import annotations

from pathlib import Path

_GEMMS = {"attn_pre_proj": "qkv", "attn_post_proj": "o", "mlp_up_proj": "gate_up", "mlp_down_proj": "down"}
_LAYER_OPS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
              "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")  # everything of one layer but attention ("emb": once)
SMALL_OPS = tuple(op for op in _LAYER_OPS if op not in _GEMMS)


def _power_of_two(x: int) -> bool:
    return x > 0 and not x & (x - 1)


def _read(path: Path):
    import pandas as pd

    if path.read_bytes()[:40].startswith(b"version https://git-lfs"):
        raise ValueError(f"{path}: a Git LFS pointer, not the table (run `git lfs pull` in the Vidur checkout)")
    try:
        frame = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as e:
        raise ValueError(f"{path}: not a CSV table ({e})") from None
    frame.columns = [c.strip() for c in frame.columns]
    return frame


def _need(frame, columns, path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a Vidur profile, missing column(s) {', '.join(missing)}")


def _ms(row, op: str) -> float:
    value = row.get(f"time_stats.{op}.median", 0.0)
    return 0.0 if value != value else float(value) * 1e-3  # NaN (an op the model lacks): 0, as Vidur reads it


def _match(frame, model, tp: int, path: Path, shape: dict[str, int]):
    """The rows of ``model``'s shapes at ``tp``; a table of another model fails naming the field."""
    for column, want in shape.items():
        have = sorted({int(v) for v in frame[column].dropna().unique()})
        if want not in have:
            raise ValueError(f"{path}: {column} is {have}, model {model.name!r} has {want} (another model's profile?)")
        frame = frame[frame[column] == want]
    tps = sorted({int(v) for v in frame["num_tensor_parallel_workers"].unique()})
    if tp not in tps:
        raise ValueError(f"{path}: no rows at --tp {tp} (num_tensor_parallel_workers has {tps})")
    return frame[frame["num_tensor_parallel_workers"] == tp]


def vidur_model(directory: Path):
    """The ModelSpec of a Vidur model folder's shapes (``mlp.csv``'s n_head, n_kv_head, n_embd, n_expanded_embd,
    vocab_size), named after the folder: what ``vidur_fit.py`` prices a model by that has no conf/model file. The
    layer count is not in the table, and one layer is what every row prices."""
    from omnisim.cost import ModelSpec

    path = Path(directory) / "mlp.csv"
    if not path.is_file():
        raise ValueError(f"{directory}: no mlp.csv (not a Vidur model folder)")
    frame = _read(path)
    columns = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size")
    _need(frame, [*columns, "use_gated_mlp"], path)
    shape = {}
    for column in columns:
        values = sorted({int(v) for v in frame[column].dropna().unique()})
        if len(values) != 1:
            raise ValueError(f"{path}: {column} is {values}, one model's profile has one value")
        shape[column] = values[0]
    if not all(str(v).strip().lower() == "true" for v in frame["use_gated_mlp"].unique()):
        raise ValueError(f"{path}: use_gated_mlp is not True; the roofline prices gated (SwiGLU) FFNs only")
    return ModelSpec(name=Path(directory).name, layers=1, hidden=shape["n_embd"], heads=shape["n_head"],
                     kv_heads=shape["n_kv_head"], head_dim=shape["n_embd"] // shape["n_head"],
                     intermediate=shape["n_expanded_embd"], vocab=shape["vocab_size"])


def vidur_rows(directory: Path, model, hardware, tp: int) -> list[dict]:
    """``operator_profile`` rows (op, name, m, k, n, flops, bytes, seconds) from a Vidur model folder; ``layer_dense``
    rows carry their own ``roofline_s`` (the simulator's cost model, not one operator's rule)."""
    from omnisim.cost import Parallelism, RooflineModel
    from omnisim.cost.roofline import activation_bytes_per_token

    if model.attention == "mla" or model.is_moe:
        raise ValueError(f"--vidur: Vidur profiles dense GQA models; {model.name!r} is not one")
    directory = Path(directory)
    mlp_path = directory / "mlp.csv"
    if not mlp_path.is_file():
        raise ValueError(f"--vidur {directory}: no mlp.csv (give a folder like data/profiling/compute/a100/"
                         f"meta-llama/Llama-2-70b-hf of a Vidur checkout)")
    mlp = _read(mlp_path)
    _need(mlp, ["n_head", "n_kv_head", "n_embd", "n_expanded_embd", "num_tokens", "num_tensor_parallel_workers",
                *(f"time_stats.{op}.median" for op in _GEMMS)], mlp_path)
    mlp = _match(mlp, model, tp, mlp_path, {"n_head": model.heads, "n_kv_head": model.kv_heads,
                                            "n_embd": model.hidden, "n_expanded_embd": model.intermediate})
    mlp = mlp.groupby("num_tokens", as_index=False).median(numeric_only=True)  # repeated runs of one shape

    b, h, d = model.dtype_bytes, model.hidden, model.head_dim
    heads, kv_heads = max(1, model.heads // tp), max(1, model.kv_heads // tp)
    shapes = {"qkv": (h, (heads + 2 * kv_heads) * d), "o": (heads * d, h),
              "gate_up": (h, 2 * model.intermediate // tp), "down": (model.intermediate // tp, h)}
    roofline = RooflineModel(model, hardware, Parallelism(tp=tp))
    small_bytes = activation_bytes_per_token(model, Parallelism(tp=tp)) / model.layers  # per token
    rows = []
    for _, r in mlp.iterrows():
        t = int(r["num_tokens"])
        if not _power_of_two(t):
            continue
        for op, name in _GEMMS.items():
            k, n = shapes[name]
            rows.append(dict(op="gemm", name=name, m=t, k=k, n=n, flops=2.0 * t * k * n,
                             bytes=b * (k * n + t * k + t * n), seconds=_ms(r, op)))
        parts = roofline.breakdown(t, t * (t + 1) / 2, t, 0, 0)
        weights = sum(k * n for k, n in shapes.values())  # per device
        # the cost model's fixed costs are those of every kernel of a step (attention, KV write, LM head, ...): the
        # layer here is charged its traffic and the fixed cost of the nine kernels Vidur's layer times
        traffic = parts["elementwise"] - roofline.kernels_per_step * hardware.kernel_latency_s
        rows.append(dict(op="layer_dense", name="layer", m=t, k=h, n=model.intermediate // tp,
                         flops=2.0 * t * weights, bytes=b * weights,
                         seconds=sum(_ms(r, op) for op in _LAYER_OPS),
                         roofline_s=(parts["dense_gemm"] + traffic) / model.layers
                         + len(_LAYER_OPS) * hardware.kernel_latency_s))
        rows.append(dict(op="elementwise", name="small", m=t, k=h, n=model.intermediate // tp, flops=0.0,
                         bytes=t * small_bytes, seconds=sum(_ms(r, op) for op in SMALL_OPS),
                         roofline_s=traffic / model.layers + len(SMALL_OPS) * hardware.kernel_latency_s))

    attn_path = directory / "attention.csv"
    if attn_path.is_file():
        rows += _attention_rows(_read(attn_path), attn_path, model, tp, heads, kv_heads)
    return [row for row in rows if row["seconds"] > 0]


def _attention_rows(frame, path: Path, model, tp: int, heads: int, kv_heads: int) -> list[dict]:
    _need(frame, ["n_q_head", "n_kv_head", "n_embd", "num_tensor_parallel_workers", "batch_size",
                  "prefill_chunk_size", "kv_cache_size", "is_prefill"], path)
    frame = _match(frame, model, tp, path, {"n_q_head": model.heads, "n_kv_head": model.kv_heads,
                                            "n_embd": model.hidden})
    frame = frame.groupby(["is_prefill", "batch_size", "prefill_chunk_size", "kv_cache_size"],
                          as_index=False).median(numeric_only=True)
    b, d = model.dtype_bytes, model.head_dim
    rows = []
    for _, r in frame.iterrows():
        batch, chunk, cached = int(r["batch_size"]), int(r["prefill_chunk_size"]), int(r["kv_cache_size"])
        if bool(r["is_prefill"]):
            if batch != 1 or not _power_of_two(chunk) or (cached and not _power_of_two(cached)):
                continue
            pairs = chunk * (cached + (chunk + 1) / 2)
            rows.append(dict(op="prefill_attention", name="vidur", m=chunk, k=cached, n=heads,
                             flops=2.0 * heads * pairs * 2 * d,
                             bytes=b * (heads * chunk * 2 * d + kv_heads * (cached + chunk) * 2 * d),
                             seconds=_ms(r, "attn_prefill")))
        elif _power_of_two(batch) and _power_of_two(cached):
            rows.append(dict(op="decode_attention", name="vidur", m=batch, k=cached, n=heads,
                             flops=2.0 * batch * heads * cached * 2 * d, bytes=b * batch * kv_heads * cached * 2 * d,
                             seconds=_ms(r, "attn_decode")))
    return rows
