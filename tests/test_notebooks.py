"""Every notebook in notebooks/ executes top to bottom (nbclient), as a user would run it, and computes what its text
says: a probe cell appended to each one reports the values the notebook computed, checked below."""
import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from omnisim.app import config_options
from omnisim.core import PROTOCOL_VERSION

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MARK = "OMNISIM_PROBE "

# Per notebook: a cell run after the notebook's own, printing what it computed as JSON.
PROBES = {
    "quickstart.ipynb": """
print(%r + json.dumps({"summary": {k: summary[k] for k in ("requests", "completed", "protocol_version")},
                        "records": len(records), "latency_rows": len(lat), "rows": rows,
                        "sweep": runs[["choice.proxy", "workload.rate", "complete", "ttft_s.p90"]].to_dict("records")}))
""",
    "placement.ipynb": """
print(%r + json.dumps({
    "imbalance": {f"{name}|{ep}": float(v) for (name, ep), v in table["max/mean"].items()},
    "moved": {f"{name}|{ep}": int(v) for (name, ep), v in table["moved slots"].items()},
    "runtime_gb_moved": {name: float(r["GB moved"]) for name, r in results.items()},
    "sim": {name: {k: float(v) for k, v in row.items()} for name, row in sim.T.to_dict().items()}}))
""",
    "proxy_policies.ipynb": """
print(%r + json.dumps({"runs": len(runs), "policies": sorted(set(runs.policy)), "setups": sorted(set(runs.setup)),
                        "table_rows": len(table), "levels": sorted(set(runs.level))}))
""",
    "pd_ratio.ipynb": """
print(%r + json.dumps({"complete": bool(runs.complete.all()), "best": best_shape, "grid": [PREFILL, DECODE],
    "rows": {shape: {k: (bool(v) if k == "meets_slo" else float(v)) for k, v in row.items()}
             for shape, row in table[["devices", "goodput_qpm", "slo_attainment", "goodput_per_device",
                                      "meets_slo"]].iterrows()}}))
""",
    "capacity_planning.ipynb": """
print(%r + json.dumps({"trials": len(study.trials), "asked": TRIALS, "target": TARGET,
    "directions": [d.name for d in study.directions], "complete": bool(runs.complete.all()),
    "rows": [{k: (bool(v) if k == "on_front" else float(v)) for k, v in row.items()} for row in
             table[["prefill.count", "prefill.tp", "decode.count", "decode.dp", "devices", "attainment",
                    "on_front"]].to_dict("records")],
    "answer": None if answer is None else {"devices": float(answer.devices), "attainment": float(answer.attainment)}}))
""",
}


def run_notebook(path: Path) -> dict:
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import json\n" + PROBES[path.name] % MARK))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors[0].get("evalue")
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    (line,) = [x for x in text.splitlines() if x.startswith(MARK)]
    return json.loads(line[len(MARK):])


def test_every_notebook_has_a_probe():
    assert {p.name for p in NOTEBOOKS} == set(PROBES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_computes_what_it_says(path):
    probe = run_notebook(path)
    if path.name == "quickstart.ipynb":
        # 300 requests on 2P1D, all served, one record and one latency row each; both clusters compared
        assert probe["summary"] == {"requests": 300, "completed": 300, "protocol_version": PROTOCOL_VERSION}
        assert probe["records"] == probe["latency_rows"] == 300
        assert set(probe["rows"]) == {"colocated4", "2p1d"}
        assert all(r["goodput_qpm"] > 0 and r["ttft_p90_ms"] > 0 and r["tpot_p90_ms"] > 0
                   for r in probe["rows"].values())
        # the sweep, loaded back with omnisim.results: one complete row per run, with its choice and override
        assert sorted((r["choice.proxy"], r["workload.rate"]) for r in probe["sweep"]) == [
            ("least_load", 4), ("least_load", 8), ("round_robin", 4), ("round_robin", 8)]
        assert all(r["complete"] and r["ttft_s.p90"] > 0 for r in probe["sweep"])
    elif path.name == "placement.ipynb":
        imbalance, moved = probe["imbalance"], probe["moved"]
        eps = {key.split("|")[1] for key in imbalance}
        assert {key.split("|")[0] for key in imbalance} == set(config_options("placement"))  # every policy
        assert eps == {"EP32", "EP144", "EP288"}
        for ep in eps:  # static keeps the contiguous layout; every rebalancer balances the skewed load better
            assert moved[f"static|{ep}"] == 0
            for name in set(config_options("placement")) - {"static"}:
                assert imbalance[f"{name}|{ep}"] < imbalance[f"static|{ep}"], (name, ep)
        assert probe["runtime_gb_moved"]["static"] == 0
        assert all(gb > 0 for name, gb in probe["runtime_gb_moved"].items() if name != "static")
        sim = probe["sim"]
        assert set(sim) == {"static", "deepseek_eplb", "omni_placement", "predictive"}
        assert sim["static"]["TPOT vs static %"] == 0
        for name in set(sim) - {"static"}:  # balancing lowers the simulated decode imbalance
            assert sim[name]["decode imbalance"] < sim["static"]["decode imbalance"], name
    elif path.name == "pd_ratio.ipynb":
        rows, (prefill, decode) = probe["rows"], probe["grid"]
        assert probe["complete"] and set(rows) == {f"{p}P{d}D" for p in prefill for d in decode}  # the xPyD grid
        for shape, r in rows.items():
            p, d = (int(x) for x in shape[:-1].split("P"))
            assert r["devices"] == 8 * p + 32 * d  # TP8 prefill, DP32 decode instances
            assert r["goodput_per_device"] == pytest.approx(r["goodput_qpm"] / r["devices"])
            assert r["meets_slo"] == (r["slo_attainment"] >= 0.9)
        meeting = {shape: r for shape, r in rows.items() if r["meets_slo"]}
        assert probe["best"] == max(meeting, key=lambda k: meeting[k]["goodput_per_device"])
    elif path.name == "capacity_planning.ipynb":
        rows = probe["rows"]
        assert probe["trials"] == probe["asked"] == len(rows) and probe["complete"]
        assert probe["directions"] == ["MINIMIZE", "MAXIMIZE"]
        for r in rows:  # each trial's devices objective is its shape's, its attainment a fraction
            assert r["devices"] == r["prefill.count"] * r["prefill.tp"] + r["decode.count"] * r["decode.dp"]
            assert 0.0 <= r["attainment"] <= 1.0

        def dominated(r):
            return any(o["devices"] <= r["devices"] and o["attainment"] >= r["attainment"] and
                       (o["devices"], o["attainment"]) != (r["devices"], r["attainment"]) for o in rows)
        assert all(r["on_front"] == (not dominated(r)) for r in rows)  # Optuna's front is the non-dominated set
        meeting = [r for r in rows if r["attainment"] >= probe["target"]]
        if meeting:
            assert probe["answer"]["devices"] == min(r["devices"] for r in meeting)
            assert probe["answer"]["attainment"] >= probe["target"]
        else:
            assert probe["answer"] is None
    else:
        assert probe["runs"] > 0 and probe["table_rows"] > 0
        assert {p.split(":")[0] for p in probe["policies"]} <= set(config_options("proxy"))
        assert set(probe["levels"]) <= {"light", "near", "over"}
