"""The proxy policy: which queued requests go where, now. And the rules every driver applies to its answer: which
instance roles serve a phase, and which assignments are valid (one function each, called by the simulator's proxy
driver, the HTTP proxy and the conformance checker alike)."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

from omnisim.core.instance import InstanceState, Role
from omnisim.core.request import Request

if TYPE_CHECKING:
    from omnisim.core.view import ClusterView


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"

    # Members are singletons compared by identity: hash them by identity too, in C (Enum's own __hash__ is a
    # Python call, and these are dict keys on every dispatch).
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class Waiting:
    """A request held in one of the proxy's queues.

    ``queued_s``: when it entered this queue. ``source_id``: in the DECODE phase, the prefill instance that holds
    the request's KV (the transfer source); None in the PREFILL phase.
    """

    request: Request
    queued_s: float
    source_id: str | None = None


@dataclass(frozen=True, slots=True)
class Assignment:
    request_id: str
    instance_id: str


class ProxyPolicy(Protocol):
    """Called by the driver on arrivals, completions and a timer, separately for each phase.

    Return the requests to dispatch now, each at most once, to instances in ``view``. Requests not returned stay
    queued and are offered again later. In the PREFILL phase, an assignment to a PREFILL instance disaggregates
    (its DECODE phase follows when the prefill is done); to a MIXED or DECODE instance, the request is prefilled
    and decoded there with no KV transfer.

    Policies read time only from ``view.now_s``, randomness only from a seed given at construction, and do no I/O.
    """

    def schedule(self, phase: Phase, queue: Sequence[Waiting], view: "ClusterView") -> Sequence[Assignment]: ...


class PolicyError(RuntimeError):
    """A proxy policy broke the contract (an invalid assignment), or a driver cannot go on with its decisions."""


# -- phase -> role ------------------------------------------------------------------------------------------------
_PHASE_ROLES = {
    Phase.PREFILL: (Role.PREFILL, Role.MIXED),
    Phase.DECODE: (Role.DECODE, Role.MIXED),
}


def roles_for(phase: Phase) -> tuple[Role, ...]:
    """The roles whose instances serve ``phase``, its candidates: PREFILL or MIXED instances prefill, DECODE or
    MIXED instances decode (MIXED instances serve both)."""
    return _PHASE_ROLES[phase]


def serves(role: Role, phase: Phase) -> bool:
    """Whether an instance of ``role`` is a candidate for ``phase`` (see ``roles_for``)."""
    return role in _PHASE_ROLES[phase]


def accepts(role: Role, phase: Phase) -> bool:
    """Whether a ``phase`` assignment may go to an instance of ``role``. PREFILL phase: any instance (a PREFILL one
    disaggregates; a DECODE or MIXED one prefills and decodes the request itself, no KV transfer). DECODE phase: a
    DECODE or MIXED instance only; a PREFILL instance never decodes a request prefilled elsewhere."""
    return phase is _PREFILL or role is not _PREFILL_ROLE


_PREFILL, _PREFILL_ROLE = Phase.PREFILL, Role.PREFILL  # module globals: an Enum member lookup costs ~0.2 us


# -- assignment validation ----------------------------------------------------------------------------------------
def check_assignments(phase: Phase, queue: Sequence[Waiting], assignments: object,
                      instances: Iterable[InstanceState]) -> tuple[dict[str, str], list[str]]:
    """Split a policy's answer into its valid part (request id -> instance id, in the policy's order) and one line
    per violation. Valid: a list or tuple of ``Assignment``s, each naming a request in ``queue`` (at most once) and
    a healthy instance in ``instances`` that ``accepts`` the phase."""
    if not isinstance(assignments, (list, tuple)):
        return {}, [f"schedule returned {type(assignments).__name__}, not a list or tuple of Assignment"]
    chosen: dict[str, str] = {}
    problems: list[str] = []
    if not assignments:
        return chosen, problems
    queued = {w.request.id for w in queue}
    states = {s.id: s for s in instances}
    refused: set[str] = set()  # request ids of invalid assignments
    for a in assignments:
        if isinstance(a, Assignment):  # the drivers' hot path: one pass of cheap tests for a valid assignment
            rid = a.request_id
            state = states.get(a.instance_id)
            if (state is not None and state.healthy and rid in queued and rid not in chosen
                    and accepts(state.role, phase) and not (refused and rid in refused)):
                chosen[rid] = a.instance_id
                continue
        problems += _violations(phase, a, queued, states, chosen.keys() | refused) or [f"{phase.value}: {a!r}"]
        if isinstance(a, Assignment):
            refused.add(a.request_id)
    return chosen, problems


def _violations(phase: Phase, a: object, queued: set[str], states: dict[str, InstanceState],
                seen: set[str]) -> list[str]:
    if not isinstance(a, Assignment):
        return [f"schedule returned {a!r}, not an Assignment"]
    rid = a.request_id
    found = []
    if rid not in queued:
        found.append(f"{phase.value}: assigned {rid!r}, which is not in the queue")
    if rid in seen:
        found.append(f"{phase.value}: assigned {rid!r} twice")
    state = states.get(a.instance_id)
    if state is None or not state.healthy:
        found.append(f"{phase.value}: assigned {rid!r} to {a.instance_id!r}, not a healthy instance in the view")
    elif not accepts(state.role, phase):
        found.append(f"{phase.value}: assigned {rid!r} to {state.role.value} instance {a.instance_id!r}")
    return found


def validate_assignments(policy_name: str, phase: Phase, queue: Sequence[Waiting], assignments: object,
                         instances: Iterable[InstanceState]) -> dict[str, str]:
    """The assignments as request id -> instance id, in the policy's order; ``PolicyError`` naming every violation
    (see ``check_assignments``) if any is invalid: a driver applies all of a call's assignments or none."""
    chosen, problems = check_assignments(phase, queue, assignments, instances)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise PolicyError(f"{policy_name}: {shown}")
    return chosen
