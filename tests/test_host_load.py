"""How busy the machine was during a real measurement (backends/vllm/host_load.py): our own CPU is told apart from
everyone else's, and the hypervisor's steal is reported."""
import subprocess
import sys
import time

import pytest

from backends.vllm.host_load import HostLoad

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_our_own_work_counts_as_own_and_a_child_of_ours_too():
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        with HostLoad(own=[child.pid]) as load:
            until = time.monotonic() + 0.6
            while time.monotonic() < until:  # this process busy as well
                pass
    finally:
        child.kill()
        child.wait()
    s = load.summary()
    assert s["wall_s"] >= 0.6 and s["cpu_count"] >= 1
    assert s["own_cores"] > 0.8  # this loop and most of the child's
    assert 0.0 <= s["steal_cores"] <= s["cpu_busy_cores"] and 0.0 <= s["steal_fraction"] < 1.0
    assert s["steal_fraction"] == pytest.approx(s["steal_cores"] / s["cpu_busy_cores"])
    ran = s["cpu_busy_cores"] - s["steal_cores"]
    assert s["background_used_cores"] == pytest.approx(max(0.0, ran - s["own_cores"]))
    assert s["background_cores"] >= s["background_used_cores"]
