"""Lets vLLM's EPLB call any omnisim placement policy (the same objects the simulator measured).

vLLM's EPLB asks a policy for a new physical-to-logical map through ``rebalance_experts(weight, num_replicas,
num_groups, num_nodes, num_ranks[, old_global_expert_indices])``: in vLLM <= 0.11 a module function
(``vllm.distributed.eplb.rebalance_algo``) returning ``(phy2log, log2phy, logcnt)``; later a classmethod of an
``AbstractEplbPolicy`` subclass registered in ``vllm.distributed.eplb.policy.EPLB_POLICIES`` (returning the triple,
or in newer releases ``phy2log`` alone). This module adapts an omnisim ``PlacementPolicy`` to all of these:

    from backends.vllm.eplb import install
    from omnisim.policies.placement import OmniPlacement
    install(OmniPlacement())          # replaces vLLM's "default" EPLB policy in this process

It must run in every vLLM process that rebalances (vLLM's general-plugin hook does that: ``plugin()`` installs the
policy that ``OMNISIM_EPLB_POLICY`` describes: the experiment's resolved conf/placement node as JSON, which
``backend=vllm`` passes, or a conf/placement option name). EPLB needs CUDA (or ROCm); vLLM-CPU refuses
``--enable-eplb``. On Ascend, vllm-ascend's ``eplb_config`` plays the same role. Inputs may be torch tensors
(answers are tensors on the same device) or numpy arrays (answers are arrays), so the adapter is tested without
vLLM too.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Any

import numpy as np

from omnisim.core import ExpertLoad, Placement, PlacementPolicy, Topology
from omnisim.policies.placement.layout import replica_counts

POLICY_ENV = "OMNISIM_EPLB_POLICY"


def _to_numpy(x: Any) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _like(value: np.ndarray, reference: Any) -> Any:
    """A torch tensor on ``reference``'s device when ``reference`` is one, else the numpy array."""
    if type(reference).__module__.startswith("torch"):
        import torch

        return torch.from_numpy(np.ascontiguousarray(value)).to(reference.device)
    return value


def logical_to_physical(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's ``log2phy [layers, experts, max copies]`` (physical slots of each expert, ascending, padded with -1)
    and ``logcnt [layers, experts]``."""
    layers, slots = phy2log.shape
    logcnt = replica_counts(phy2log, num_experts)
    width = max(1, int(logcnt.max(initial=1)))
    order = np.argsort(phy2log, axis=1, kind="stable")               # slots grouped by expert, ascending
    expert_sorted = np.take_along_axis(phy2log, order, axis=1)
    first = np.concatenate([np.zeros((layers, 1), dtype=np.int64), np.cumsum(logcnt, axis=1)[:, :-1]], axis=1)
    copy_index = np.arange(slots)[None, :] - np.take_along_axis(first, expert_sorted, axis=1)
    log2phy = np.full((layers, num_experts, width), -1, dtype=np.int64)
    log2phy[np.arange(layers)[:, None], expert_sorted, copy_index] = order
    return log2phy, logcnt


def rebalance_experts(policy: PlacementPolicy, weight: Any, num_replicas: int, num_groups: int, num_nodes: int,
                      num_ranks: int, old_global_expert_indices: Any = None) -> tuple[Any, Any, Any]:
    """vLLM's signature, answered by ``policy``: ``(phy2log, log2phy, logcnt)``.

    weight: ``[layers, experts]`` loads (or ``[windows, layers, experts]``, summed). old_global_expert_indices: the
    current ``phy2log``; without it the policy starts from vLLM's initial map (slot i serves expert i % experts).
    """
    counts = _to_numpy(weight).astype(np.float64)
    if counts.ndim == 3:
        counts = counts.sum(axis=0)
    if counts.ndim != 2:
        raise ValueError(f"eplb: weight must be [layers, experts], got shape {counts.shape}")
    layers, experts = counts.shape
    if num_ranks < 1 or num_replicas % num_ranks:
        raise ValueError(f"eplb: num_replicas={num_replicas} must be a multiple of num_ranks={num_ranks}")
    topology = Topology(num_ranks, num_replicas // num_ranks, num_nodes, num_groups)
    if old_global_expert_indices is None:
        current = Placement.contiguous(layers, experts, topology)
    else:
        current = Placement(_to_numpy(old_global_expert_indices).astype(np.int64))
        if current.phy2log.shape != (layers, num_replicas):
            raise ValueError(f"eplb: old_global_expert_indices has shape {current.phy2log.shape}, expected "
                             f"{(layers, num_replicas)}")
    placement = policy.rebalance(ExpertLoad(np.clip(counts, 0.0, None)), current, topology)
    placement.validate(experts, topology)
    phy2log = np.array(placement.phy2log)
    log2phy, logcnt = logical_to_physical(phy2log, experts)
    return _like(phy2log, weight), _like(log2phy, weight), _like(logcnt, weight)


def _vllm_base() -> type | None:
    try:
        from vllm.distributed.eplb.policy import AbstractEplbPolicy
    except Exception:  # no vllm, or a release without the policy package
        return None
    return AbstractEplbPolicy


def _returns_triple(base: type | None) -> bool:
    """Older policy classes return (phy2log, log2phy, logcnt); newer ones phy2log alone."""
    if base is None:
        return True
    hint = inspect.signature(base.rebalance_experts).return_annotation
    return "tuple" in str(hint).lower()


def eplb_policy_class(policy: PlacementPolicy, returns: str = "auto") -> type:
    """A vLLM EPLB policy class (subclass of vLLM's ``AbstractEplbPolicy`` when importable) whose classmethod
    ``rebalance_experts`` asks ``policy``. returns: ``triple``, ``phy2log`` or ``auto`` (what the installed vLLM's
    abstract method declares). When vLLM passes no current map, the last map this class returned is used."""
    if returns not in ("auto", "triple", "phy2log"):
        raise ValueError(f"eplb: returns must be auto, triple or phy2log, got {returns!r}")
    base = _vllm_base()
    triple = _returns_triple(base) if returns == "auto" else returns == "triple"

    def rebalance(cls, weight, num_replicas, num_groups, num_nodes, num_ranks, old_global_expert_indices=None):
        if old_global_expert_indices is None and cls.last_phy2log is not None \
                and cls.last_phy2log.shape == (_to_numpy(weight).shape[-2], num_replicas):
            old_global_expert_indices = cls.last_phy2log
        out = rebalance_experts(cls.policy, weight, num_replicas, num_groups, num_nodes, num_ranks,
                                old_global_expert_indices)
        cls.last_phy2log = _to_numpy(out[0])
        return out if triple else out[0]

    name = f"Omnisim{type(policy).__name__}EplbPolicy"
    return type(name, (base,) if base is not None else (), {
        "policy": policy, "last_phy2log": None, "rebalance_experts": classmethod(rebalance),
        "__doc__": f"vLLM EPLB policy answered by omnisim's {type(policy).__name__}."})


def install(policy: PlacementPolicy, name: str = "default") -> type:
    """Make vLLM's EPLB use ``policy`` in this process: replaces ``EPLB_POLICIES[name]`` (the policy package) and,
    in releases without it, ``rebalance_algo.rebalance_experts``. Returns the policy class."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ImportError("eplb.install needs vllm (EPLB itself needs a CUDA or ROCm build)") from e
    cls = eplb_policy_class(policy)
    installed = False
    try:
        import vllm.distributed.eplb.policy as policies

        policies.EPLB_POLICIES[name] = cls
        installed = True
    except ImportError:
        pass
    try:
        import vllm.distributed.eplb.rebalance_algo as algo

        def function(weight, num_replicas, num_groups, num_nodes, num_gpus, *rest):
            return rebalance_experts(policy, weight, num_replicas, num_groups, num_nodes, num_gpus, *rest)

        algo.rebalance_experts = function
        installed = True
    except ImportError:
        pass
    if not installed:
        raise ImportError("eplb.install: this vllm has neither vllm.distributed.eplb.policy nor rebalance_algo")
    return cls


def policy_from_env(value: str) -> PlacementPolicy:
    """The policy ``OMNISIM_EPLB_POLICY`` describes: a JSON conf/placement node (``{"_target_": ..., ...}``, every
    argument as configured; what backend=vllm passes), or the name of a conf/placement option (its yaml values,
    seed 0)."""
    from omnisim.app import compose_option, instantiate_node

    text = value.strip()
    if text.startswith("{"):
        try:
            node = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{POLICY_ENV}: not a JSON placement config ({e})") from None
    else:
        try:
            node = compose_option("placement", text)
        except ValueError as e:
            raise ValueError(f"{POLICY_ENV}={text!r}: {e}") from None
    policy = instantiate_node(node, seed=0)
    if not callable(getattr(policy, "rebalance", None)):
        raise ValueError(f"{POLICY_ENV}: {type(policy).__name__} is not a placement policy (no rebalance)")
    return policy


def plugin() -> None:
    """vLLM general-plugin entry: installs the omnisim policy ``OMNISIM_EPLB_POLICY`` describes (see
    ``policy_from_env``); does nothing when the variable is unset."""
    value = os.environ.get(POLICY_ENV)
    if not value:
        return
    install(policy_from_env(value))
