"""Small, fast building blocks for simulator tests: an affine step-time model and a seeded workload."""
from __future__ import annotations

import random
from types import SimpleNamespace

from omnisim.cluster import ClusterSpec, InstanceGroup
from omnisim.core import Request
from omnisim.experiment import Experiment
from omnisim.policies import RoundRobin


class AffineCost:
    """Step time affine in every input: exact for the simulator's closed-form runs of decode steps."""

    def __init__(self, **_):
        pass

    def step_time(self, pt, pa, pc, n, ctx, imb=1.0):
        return 0.004 + pt * 2e-5 + pa * 1e-9 + pc * 1e-8 + n * 5e-5 + ctx * 3e-8


class Workload:
    def __init__(self, n=300, rate=4.0, seed=0, prefixes=0, prompt=(200, 3000), output=(1, 400)):
        self.n, self.rate, self.seed, self.prefixes = n, rate, seed, prefixes
        self.prompt, self.output = prompt, output

    def requests(self):
        rng = random.Random(self.seed)
        t = 0.0
        for i in range(self.n):
            t += rng.expovariate(self.rate)
            p = rng.randint(*self.prompt)
            hashes = ()
            if self.prefixes:
                shared = rng.randrange(self.prefixes)
                hashes = tuple(shared * 1_000_003 + k for k in range(p // 512))
            yield Request(f"r{i}", t, p, rng.randint(*self.output), hashes, 512 if hashes else 0)


class Listed:
    """A workload of the given (arrival, prompt, output) requests."""

    def __init__(self, *reqs):
        self.reqs = reqs

    def requests(self):
        for i, (t, p, o) in enumerate(self.reqs):
            yield Request(f"r{i}", t, p, o)


def pd_cluster(p=2, d=1, p_kv=200_000, d_kv=100_000, **kw) -> ClusterSpec:
    return ClusterSpec(prefill=InstanceGroup(count=p, kv_capacity_tokens=p_kv, max_model_len=8192, **kw),
                       decode=InstanceGroup(count=d, kv_capacity_tokens=d_kv, max_model_len=8192, **kw))


def colocated(n=2, kv=100_000, **kw) -> ClusterSpec:
    return ClusterSpec(mixed=InstanceGroup(count=n, kv_capacity_tokens=kv, max_model_len=8192, **kw))


def experiment(cluster, workload=None, policy=None, seed=0) -> Experiment:
    model = SimpleNamespace(kv_bytes_per_token=70_000.0)
    return Experiment("test", seed, model, None, cluster, workload or Workload(seed=seed),
                      policy or RoundRobin(seed), None, AffineCost)
