"""The rules every driver applies to a proxy policy's answer, written once in omnisim.core.dispatch: which roles
serve a phase, and which assignments are valid. Each rule is pinned here for the core functions, the simulator's
proxy driver and the conformance checker (the HTTP proxy's side: tests/test_proxy_policy_errors.py)."""
from __future__ import annotations

import pytest

from omnisim.core import (
    Assignment, ClusterView, InstanceState, Phase, PolicyError, Request, Role, Waiting, accepts, check_assignments,
    roles_for, serves, validate_assignments,
)
from omnisim.core.conformance import ConformanceError, check_proxy_policy
from omnisim.policies import RoundRobin

P, D, M = Role.PREFILL, Role.DECODE, Role.MIXED


def test_which_roles_serve_a_phase():
    assert roles_for(Phase.PREFILL) == (P, M)
    assert roles_for(Phase.DECODE) == (D, M)
    assert [r for r in Role if serves(r, Phase.PREFILL)] == [P, M]
    assert [r for r in Role if serves(r, Phase.DECODE)] == [D, M]
    # assignments: anything in the PREFILL phase (a decode or mixed instance serves the request whole), never a
    # prefill instance in the DECODE phase
    assert [r for r in Role if accepts(r, Phase.PREFILL)] == [P, D, M]
    assert [r for r in Role if accepts(r, Phase.DECODE)] == [D, M]


def test_view_candidates_follow_the_rule():
    states = tuple(InstanceState(f"{r.value}-{h}", r, healthy=h) for r in Role for h in (True, False))
    view = ClusterView(0.0, states)
    for phase in Phase:
        assert [s.id for s in view.candidates(phase)] == [f"{r.value}-True" for r in roles_for(phase)]


STATES = (InstanceState("p0", P), InstanceState("d0", D), InstanceState("m0", M), InstanceState("sick", D, False))


def queue(*ids):
    return [Waiting(Request(i, 0.0, 10, 2), 0.0) for i in ids]


@pytest.mark.parametrize("phase, out, why", [
    (Phase.PREFILL, [Assignment("a", "nowhere")], "'nowhere', not a healthy instance"),
    (Phase.PREFILL, [Assignment("a", "sick")], "'sick', not a healthy instance"),
    (Phase.PREFILL, [Assignment("a", "p0"), Assignment("a", "m0")], "'a' twice"),
    (Phase.PREFILL, [Assignment("ghost", "p0")], "'ghost', which is not in the queue"),
    (Phase.DECODE, [Assignment("a", "p0")], "to prefill instance 'p0'"),
    (Phase.PREFILL, None, "returned NoneType, not a list or tuple"),
    (Phase.PREFILL, (a for a in [Assignment("a", "p0")]), "returned generator"),
    (Phase.PREFILL, [("a", "p0")], "not an Assignment"),
])
def test_invalid_assignments_are_refused(phase, out, why):
    with pytest.raises(PolicyError, match=why) as e:
        validate_assignments("Bad", phase, queue("a", "b"), out, STATES)
    assert str(e.value).startswith("Bad: ")


def test_valid_assignments_map_requests_to_instances_in_the_policys_order():
    q = queue("a", "b", "c")
    out = [Assignment("c", "m0"), Assignment("a", "d0")]
    assert list(validate_assignments("Good", Phase.PREFILL, q, out, STATES).items()) == [("c", "m0"), ("a", "d0")]
    assert validate_assignments("Good", Phase.DECODE, q, [Assignment("b", "d0")], STATES) == {"b": "d0"}
    assert validate_assignments("Good", Phase.DECODE, q, [], STATES) == {}
    chosen, problems = check_assignments(Phase.DECODE, q, [Assignment("a", "m0"), Assignment("b", "p0")], STATES)
    assert chosen == {"a": "m0"} and problems == ["decode: assigned 'b' to prefill instance 'p0'"]


# -- the same policies, refused by the simulator and the conformance checker --------------------------------------
class DecodeOnPrefill(RoundRobin):
    def schedule(self, phase, queue, view):
        pre = [s for s in view.instances if s.role is Role.PREFILL]
        if phase is Phase.DECODE:
            return [Assignment(w.request.id, pre[0].id) for w in queue]
        return super().schedule(phase, queue, view)


class Twice(RoundRobin):
    def schedule(self, phase, queue, view):
        out = super().schedule(phase, queue, view)
        return out + out[:1]


class Unknown(RoundRobin):
    def schedule(self, phase, queue, view):
        return [Assignment(w.request.id, "nowhere") for w in queue]


class NotQueued(RoundRobin):
    def schedule(self, phase, queue, view):
        out = super().schedule(phase, queue, view)
        return out + [Assignment("ghost", out[0].instance_id)] if out else out


BAD = [(DecodeOnPrefill, "to prefill instance"), (Twice, "twice"), (Unknown, "not a healthy instance"),
       (NotQueued, "not in the queue")]


@pytest.mark.parametrize("policy, why", BAD, ids=[b[0].__name__ for b in BAD])
def test_simulator_refuses_invalid_assignments(policy, why):
    from omnisim.sim import PolicyError as SimPolicyError
    from omnisim.sim import Simulation
    from tests.sim_fixtures import Workload, experiment, pd_cluster

    assert SimPolicyError is PolicyError  # the old import path still works
    with pytest.raises(PolicyError, match=why):
        Simulation(experiment(pd_cluster(), Workload(n=5), policy=policy(0))).run()


@pytest.mark.parametrize("policy, why", BAD, ids=[b[0].__name__ for b in BAD])
def test_conformance_checker_refuses_invalid_assignments(policy, why):
    with pytest.raises(ConformanceError, match=why):
        check_proxy_policy(policy, calls=50)
