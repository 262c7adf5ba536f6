"""A per-layer quality table for OmniAttn's pattern search: the loss of compressing each layer alone.

The file is CSV with a header naming at least ``layer`` and ``score``; more columns are allowed (the harness writes
``kl`` and ``passkey_accuracy`` beside ``score``) and ignored; blank lines and lines starting with ``#`` are skipped::

    # loss of compressing one layer (sink + recent window), lower is better
    layer,score
    0,0.0123
    1,0.0040

A pattern's loss is the sum of the scores of its compressed layers (additive: interactions between layers are
ignored; measure whole patterns with the harness when they matter). Scores may be negative; ``inf`` marks a layer
that must stay full. Every layer of the pattern appears exactly once.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np


def read_quality_table(path: str | Path, num_layers: int | None = None) -> dict[int, float]:
    """{layer: score} from a table file. ValueError with FILE:LINE on a malformed row, or on a layer outside
    ``0..num_layers - 1`` when ``num_layers`` is given."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: quality table does not exist")
    with path.open(newline="") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"{path}: empty quality table (expected a header 'layer,score' and one row per layer)")
    rows = csv.reader([line for _, line in lines])
    header_line = lines[0][0]
    header = [h.strip() for h in next(rows)]
    if "layer" not in header or "score" not in header:
        raise ValueError(f"{path}:{header_line}: header {','.join(header)!r} lacks 'layer' and 'score' columns")
    li, si = header.index("layer"), header.index("score")
    scores: dict[int, float] = {}
    for (n, _), row in zip(lines[1:], rows):
        where = f"{path}:{n}"
        if len(row) != len(header):
            raise ValueError(f"{where}: expected {len(header)} fields ({','.join(header)}), got {len(row)}")
        try:
            layer = int(row[li])
        except ValueError:
            raise ValueError(f"{where}: layer {row[li].strip()!r} is not an integer") from None
        try:
            score = float(row[si])
        except ValueError:
            raise ValueError(f"{where}: score {row[si].strip()!r} is not a number") from None
        if math.isnan(score) or score == -math.inf:
            raise ValueError(f"{where}: score {row[si].strip()!r} must be a number or inf (stay full)")
        if layer < 0:
            raise ValueError(f"{where}: layer {layer} is negative")
        if num_layers is not None and layer >= num_layers:
            raise ValueError(f"{where}: layer {layer} outside 0..{num_layers - 1} (the pattern has {num_layers} "
                             "entries)")
        if layer in scores:
            raise ValueError(f"{where}: layer {layer} appears twice")
        scores[layer] = score
    if not scores:
        raise ValueError(f"{path}: no rows after the header")
    return scores


def table_scores(table: dict[int, float], num_layers: int, path: str | Path = "quality table") -> np.ndarray:
    """The table as one score per layer of a ``num_layers``-entry pattern; ValueError naming what is out of range
    or missing."""
    outside = sorted(layer for layer in table if layer >= num_layers)
    if outside:
        raise ValueError(f"{path}: layer {outside[0]} outside 0..{num_layers - 1} (the pattern has {num_layers} "
                         "entries)")
    missing = [layer for layer in range(num_layers) if layer not in table]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        raise ValueError(f"{path}: no score for layer(s) {shown} (the pattern has {num_layers} entries)")
    return np.array([table[layer] for layer in range(num_layers)], dtype=float)


def write_quality_table(path: str | Path, scores, extra: dict[str, list] | None = None, comment: str = "") -> None:
    """Write ``layer,score`` (plus ``extra`` columns, one value per layer) that read_quality_table reads back."""
    extra = extra or {}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        for line in comment.splitlines():
            f.write(f"# {line}\n")
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["layer", "score", *extra])
        for layer, score in enumerate(scores):
            w.writerow([layer, repr(float(score)), *(repr(float(v[layer])) for v in extra.values())])
