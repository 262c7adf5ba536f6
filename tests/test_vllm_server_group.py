"""Server processes: started as process groups, waited for on /health, always stopped with their children; a
server that dies or never gets healthy is a clear error carrying its log. Uses small fake servers, no vllm."""
import os
import socket
import sys
import textwrap
import time

import pytest

from backends.vllm.launch_plan import InstanceLaunch
from backends.vllm.server_group import AttachedServers, ServerGroup, ServerStartError, free_port_block

FAKE_SERVER = textwrap.dedent("""
    import http.server, signal, subprocess, sys, time
    port, delay, mode = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    if mode == "crash":
        print("boom: model config is invalid", flush=True)
        sys.exit(3)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(delay)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # like vLLM's engine core
    open("child.pid", "w").write(str(child.pid))
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" and mode != "sick" else 503)
            self.end_headers()
        def log_message(self, *args):
            pass
    print("fake server listening", flush=True)
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.fixture
def launches(tmp_path):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)

    def make(*modes, delay=0.2):
        base = free_port_block(len(modes))
        return [InstanceLaunch(id=f"mixed-{k}", role="mixed", host="127.0.0.1", port=base + k,
                               argv=(sys.executable, str(script), str(base + k), str(delay), mode),
                               env={"FAKE": "1"}, work_dir=tmp_path / f"mixed-{k}")
                for k, mode in enumerate(modes)]
    return make


def child_pid(launch) -> int:
    return int((launch.work_dir / "child.pid").read_text())


def test_start_wait_and_stop_reaches_the_children(launches):
    xs = launches("ok", "ok")
    with ServerGroup(xs, startup_timeout_s=30, poll_interval_s=0.1) as group:
        assert set(group.ready_after_s) == {"mixed-0", "mixed-1"}
        assert all(0 < t < 30 for t in group.ready_after_s.values())
        children = [child_pid(x) for x in xs]
        assert all(alive(p) for p in children)
        assert "fake server listening" in xs[0].log_path.read_text()
    assert not any(alive(p) for p in children)
    assert all(p.poll() is not None for p in group.procs.values())


def test_servers_get_their_own_process_group_in_the_launchers_session(launches):
    # a session each would put every server in its own autogroup, and cores shared among groups stall whole servers
    xs = launches("ok", "ok")
    with ServerGroup(xs, startup_timeout_s=30, poll_interval_s=0.1) as group:
        pids = [p.pid for p in group.procs.values()]
        assert [os.getpgid(p) for p in pids] == pids
        assert {os.getsid(p) for p in pids} == {os.getsid(0)}
        assert all(os.getpgid(child_pid(x)) == pid for x, pid in zip(xs, pids))


def test_a_server_that_exits_while_starting_is_reported_with_its_log(launches):
    xs = launches("ok", "crash", delay=5)
    started = time.monotonic()
    with pytest.raises(ServerStartError, match=r"(?s)mixed-1 exited with code 3.*boom: model config is invalid"):
        with ServerGroup(xs, startup_timeout_s=60, poll_interval_s=0.1):
            pass
    assert time.monotonic() - started < 30  # noticed at once, not at the timeout


def test_a_server_never_healthy_times_out_with_its_log_and_is_stopped(launches):
    xs = launches("sick")
    group = ServerGroup(xs, startup_timeout_s=2, poll_interval_s=0.1)
    with pytest.raises(ServerStartError, match=r"(?s)mixed-0 not healthy after 2 s.*fake server listening"):
        with group:
            pass
    assert all(p.poll() is not None for p in group.procs.values())


def test_a_server_ignoring_sigterm_is_killed(launches):
    xs = launches("stubborn")
    group = ServerGroup(xs, startup_timeout_s=30, stop_timeout_s=1, poll_interval_s=0.1)
    with group:
        child = child_pid(xs[0])
    assert group.procs["mixed-0"].poll() is not None and not alive(child)


def test_an_error_in_the_body_still_stops_everything(launches):
    xs = launches("ok")
    with pytest.raises(KeyboardInterrupt):
        with ServerGroup(xs, startup_timeout_s=30, poll_interval_s=0.1) as group:
            child = child_pid(xs[0])
            raise KeyboardInterrupt  # Ctrl-C during a run
    assert group.procs["mixed-0"].poll() is not None and not alive(child)


def test_attaching_waits_for_servers_started_elsewhere_and_leaves_them_running(launches):
    xs = launches("ok")
    with ServerGroup(xs, startup_timeout_s=30, poll_interval_s=0.1) as group:
        with AttachedServers(xs, startup_timeout_s=30, poll_interval_s=0.1) as attached:
            assert set(attached.ready_after_s) == {"mixed-0"} and attached.dead() == {}
        assert group.dead() == {}  # still running after detaching
    nobody = launches("ok")  # planned, never started
    with pytest.raises(ServerStartError, match=r"mixed-0 \(http://127.0.0.1:\d+\) not healthy.*node scripts"):
        with AttachedServers(nobody, startup_timeout_s=0.5, poll_interval_s=0.1):
            pass


def test_free_port_block_is_bindable():
    base = free_port_block(3)
    for port in range(base, base + 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_no_launches_is_an_error():
    with pytest.raises(ValueError, match="no instances"):
        ServerGroup([])
