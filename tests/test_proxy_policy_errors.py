"""The HTTP proxy applies the simulator's rules to a policy's answer (omnisim.core.dispatch; the simulator's side is
pinned in tests/test_dispatch_rules.py). A policy that raises or answers invalidly is logged, counted in /metrics,
its requests answered 503 at once, and the proxy keeps serving."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest

from omnisim.core import Assignment, Phase
from omnisim.policies import RoundRobin
from tests.test_proxy import cluster, post, run, wait_until

pytestmark = pytest.mark.timeout(120)


class Misbehaves(RoundRobin):
    """Round robin, except on calls that offer a request whose id starts with "bad": there it does ``how``."""

    def __init__(self, how: str, phase: Phase = Phase.PREFILL):
        super().__init__(0)
        self.how, self.phase = how, phase

    def schedule(self, phase, queue, view):
        out = super().schedule(phase, queue, view)
        if phase is not self.phase or not any(w.request.id.startswith("bad") for w in queue):
            return out
        if self.how == "raise":
            raise RuntimeError("boom")
        if self.how == "none":
            return None
        if self.how == "twice":
            return out + out[:1]
        if self.how == "unknown":
            return [Assignment(a.request_id, "nowhere") for a in out]
        if self.how == "not_queued":
            return out + [Assignment("ghost", out[0].instance_id)]
        if self.how == "to_prefill":
            return [Assignment(a.request_id, "prefill-0") for a in out]
        if self.how == "unhealthy":
            return [Assignment(a.request_id, "decode-1") for a in out]
        raise AssertionError(self.how)


CASES = [("raise", Phase.PREFILL, "failed: RuntimeError: boom"),
         ("raise", Phase.DECODE, "failed: RuntimeError: boom"),
         ("none", Phase.PREFILL, "returned NoneType, not a list or tuple"),
         ("twice", Phase.PREFILL, "twice"),
         ("unknown", Phase.PREFILL, "'nowhere', not a healthy instance"),
         ("not_queued", Phase.DECODE, "'ghost', which is not in the queue"),
         ("to_prefill", Phase.DECODE, "to prefill instance 'prefill-0'"),
         ("unhealthy", Phase.PREFILL, "'decode-1', not a healthy instance")]


@pytest.mark.parametrize("how, phase, why", CASES, ids=[f"{c[0]}-{c[1].value}" for c in CASES])
def test_a_failing_policy_is_answered_503_counted_and_survived(how, phase, why, caplog):
    async def main():
        policy = Misbehaves(how, phase)
        async with cluster(prefill=1, decode=2, policy=policy, queue_timeout_s=30) as (fleet, proxy, s):
            fleet["decode-1"].healthy = False
            await wait_until(lambda: not proxy.upstreams["decode-1"].healthy)
            started = asyncio.get_running_loop().time()
            status, headers, text = await post(s, proxy.url, {"prompt": "a b c", "max_tokens": 2},
                                               headers={"X-Request-Id": "bad-1"})
            assert asyncio.get_running_loop().time() - started < 5  # at once, not after queue_timeout_s
            assert status == 503 and "Retry-After" in headers, text
            error = json.loads(text)["error"]
            assert error["type"] == "policy_failed" and "Misbehaves" in error["message"]
            assert why in error["message"]
            decoded = [r for r in fleet["prefill-0"].received if r["body"].get("max_tokens") != 1]
            assert decoded == []  # nothing was ever decoded on the prefill instance
            async with s.get(proxy.url + "/metrics") as r:
                metrics = await r.text()
            assert 'omnisim_proxy_errors_total{kind="policy"} 1.0' in metrics
            assert 'omnisim_proxy_requests_total{endpoint="completions",status="503"} 1.0' in metrics
            assert not proxy.dispatcher.queued()
            status, headers, text = await post(s, proxy.url, {"prompt": "a b c", "max_tokens": 2})
            assert status == 200 and headers["x-omnisim-decode-instance"] == "decode-0", text  # still serving
            await wait_until(lambda: all(u.outstanding == 0 for u in proxy.upstreams.values()))

    with caplog.at_level(logging.WARNING, logger="backends.proxy"):
        run(main())
    assert "policy Misbehaves" in caplog.text


def test_only_decode_or_mixed_instances_serve_the_decode_phase():
    async def main():
        async with cluster(prefill=1, decode=1) as (fleet, proxy, s):
            fleet["decode-0"].healthy = False
            await wait_until(lambda: not proxy.upstreams["decode-0"].healthy)
            status, headers, text = await post(s, proxy.url, {"prompt": "a b", "max_tokens": 2})
            assert status == 503 and "no healthy instance for the decode phase" in text  # prefill-0 does not count
            async with s.get(proxy.url + "/health") as r:
                assert r.status == 503 and (await r.json())["upstreams"] == {"prefill-0": True, "decode-0": False}

    run(main())


def test_a_prefill_phase_assignment_to_a_decode_instance_serves_the_request_there_whole():
    class ToDecode:
        def schedule(self, phase, queue, view):
            return [Assignment(w.request.id, "decode-0") for w in queue]

    async def main():
        async with cluster(prefill=1, decode=1, policy=ToDecode()) as (fleet, proxy, s):
            status, headers, text = await post(s, proxy.url, {"prompt": "a b", "max_tokens": 2})
            assert status == 200, text
            assert headers["x-omnisim-prefill-instance"] == "" and headers["x-omnisim-decode-instance"] == "decode-0"
            assert not fleet["prefill-0"].received

    run(main())
