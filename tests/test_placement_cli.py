"""omnisim-placement: placements from recorded load files, JSON report, clear errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

from omnisim.core import Placement, Topology
from omnisim.moe import ZipfLoad, write_load_csv
from omnisim.placement_cli import main
from omnisim.policies.placement.layout import max_over_mean


@pytest.fixture
def load_file(tmp_path):
    counts = ZipfLoad(0.8, seed=2).shares(0, 4, 64) * 1e5
    np.save(tmp_path / "load.npy", counts)
    return tmp_path / "load.npy", counts


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("policy", ["static", "deepseek_eplb", "omni_placement", "migration_aware"])
def test_cli_reports_balance_and_writes_the_map(load_file, tmp_path, capsys, policy):
    path, counts = load_file
    out = tmp_path / "p.npy"
    assert main(["--load", str(path), "--ranks", "8", "--slots", "72", "--nodes", "2", "--groups", "4",
                 "--policy", policy, "--out", str(out)]) == 0
    report = last_json(capsys)
    phy2log = np.load(out)
    assert phy2log.shape == (4, 72)
    Placement(phy2log).validate(64, Topology(8, 9, 2, 4))
    assert np.allclose(report["max_over_mean"]["per_layer"], max_over_mean(phy2log, counts, 8), atol=1e-5)
    assert len(report["replicas_used"]["per_layer"]) == 4 and report["seconds"] >= 0
    if policy != "static":
        assert report["max_over_mean"]["overall"] < report["max_over_mean"]["start_overall"]
    else:
        assert report["replicas_used"]["total"] == 0


def test_cli_reads_sglang_csv_and_sums_windows(tmp_path, capsys):
    counts = np.stack([ZipfLoad(0.8, seed=s).shares(0, 2, 16) * 1000 for s in (1, 2)])
    write_load_csv(tmp_path / "d.csv", counts)
    assert main(["--load", str(tmp_path / "d.csv"), "--ranks", "4", "--slots", "20", "--policy",
                 "deepseek_eplb"]) == 0
    report = last_json(capsys)
    assert report["layers"] == 2 and report["experts"] == 16 and report["slots_per_rank"] == 5


def test_cli_errors_name_the_problem(load_file, capsys):
    path, _ = load_file
    assert main(["--load", str(path), "--ranks", "7", "--slots", "72", "--policy", "static"]) == 2
    assert "--slots 72 is not divisible by --ranks 7" in capsys.readouterr().err
    assert main(["--load", str(path), "--ranks", "8", "--slots", "56", "--policy", "static"]) == 2
    assert "cannot hold the 64 experts" in capsys.readouterr().err
    assert main(["--load", str(path) + ".missing", "--ranks", "8", "--slots", "72", "--policy", "static"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_output_and_starting_files_name_the_flag_and_write_nothing(load_file, tmp_path, capsys):
    path, _ = load_file
    base = ["--load", str(path), "--ranks", "8", "--slots", "72", "--policy", "static"]
    assert main([*base, "--out", str(tmp_path / "no" / "such" / "dir" / "p.npy")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "no").exists()
    (tmp_path / "pickled.npy").write_bytes(b"\x93NUMPY garbage")
    for current in (tmp_path / "pickled.npy", tmp_path / "missing.npy"):
        assert main([*base, "--current", str(current)]) == 2
        err = capsys.readouterr().err
        assert f"--current {current}" in err and "Traceback" not in err


def test_console_script_entry_point(load_file):
    path, _ = load_file
    done = subprocess.run([sys.executable, "-m", "omnisim.placement_cli", "--load", str(path), "--ranks", "8",
                           "--slots", "72", "--policy", "omni_placement_static"], capture_output=True, text=True,
                          check=True)
    assert "max_over_mean" in json.loads(done.stdout.strip().splitlines()[-1])


def test_the_policy_gets_the_yaml_values_and_set_overrides(load_file, capsys, monkeypatch):
    import omnisim.placement_cli as cli

    built = []
    real = cli.instantiate_node
    monkeypatch.setattr(cli, "instantiate_node", lambda node, seed: built.append(real(node, seed)) or built[-1])
    path, _ = load_file
    args = ["--load", str(path), "--ranks", "8", "--slots", "72", "--seed", "4", "--policy"]
    # conf/placement/migration_aware.yaml: stall_fraction 0.05, moves_per_rank_per_step 1 (constructor: 1.0, 0)
    assert main(args + ["migration_aware"]) == 0
    policy = built[-1]
    assert (policy.stall_fraction, policy.moves_per_rank_per_step, policy.seed) == (0.05, 1, 4)
    assert last_json(capsys)["config"]["stall_fraction"] == 0.05
    assert main(args + ["migration_aware", "--set", "stall_fraction=0.5", "--set", "swap_rounds=3"]) == 0
    assert (built[-1].stall_fraction, built[-1].swap_rounds, built[-1].moves_per_rank_per_step) == (0.5, 3, 1)
    assert last_json(capsys)["config"]["swap_rounds"] == 3
    assert main(args + ["predictive", "--set", "inner.min_gain=0.1"]) == 0  # a nested node: the inner policy
    assert built[-1].inner.min_gain == 0.1 and built[-1].inner.stall_fraction == 0.05
    capsys.readouterr()


def test_set_errors_name_the_key(load_file, capsys):
    path, _ = load_file
    args = ["--load", str(path), "--ranks", "8", "--slots", "72", "--policy", "migration_aware", "--set"]
    assert main(args + ["no_such_key=1"]) == 2
    assert "no key 'no_such_key'" in capsys.readouterr().err
    assert main(args + ["stall_fraction=-1"]) == 2
    assert "stall_fraction" in capsys.readouterr().err
