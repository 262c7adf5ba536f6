"""The cluster as a policy sees it at one instant."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from omnisim.core.dispatch import Phase, roles_for
from omnisim.core.instance import InstanceState
from omnisim.core.request import Request


class PrefixLookup(Protocol):
    def cached_tokens(self, request: Request, instance_id: str) -> int:
        """Prompt tokens of ``request`` whose KV is already cached on ``instance_id``."""
        ...


class NoPrefixCache:
    """Lookup for drivers that know no cache contents: nothing is ever cached."""

    def cached_tokens(self, request: Request, instance_id: str) -> int:
        return 0


NO_PREFIX_CACHE = NoPrefixCache()


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Time, instance snapshots and a lazy prefix lookup. Never copies cache contents."""

    now_s: float
    instances: tuple[InstanceState, ...]
    prefix: PrefixLookup = NO_PREFIX_CACHE

    def candidates(self, phase: Phase) -> tuple[InstanceState, ...]:
        """Healthy instances that serve ``phase`` (MIXED instances serve both)."""
        roles = roles_for(phase)
        return tuple(s for s in self.instances if s.healthy and s.role in roles)

    def instance(self, instance_id: str) -> InstanceState:
        for s in self.instances:
            if s.id == instance_id:
                return s
        raise KeyError(f"no instance {instance_id!r} in the view")

    def cached_tokens(self, request: Request, instance_id: str) -> int:
        return self.prefix.cached_tokens(request, instance_id)
