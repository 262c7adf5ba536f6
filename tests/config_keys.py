"""One check for every conf/ option: its composed node names exactly its ``_target_`` constructor's arguments.

    from tests.config_keys import group_options, composed, check_keys
    for group, option in group_options():
        check_keys(composed(group, option), f"{group}/{option}")

``composed`` is the node as the app composes it (defaults list applied: nested instance groups, inner policies, base
options), unresolved. ``check_keys`` walks nested nodes (a dict with ``_target_``, inside dicts and lists) too.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from hydra.utils import get_class

from omnisim.app import CONF_DIR, compose_option, config_options

CONF = Path(CONF_DIR)
OVERLAY_GROUPS = {"experiment", "sweep", "hydra"}  # global overlays, not one constructor each
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
# Arguments the caller passes when it calls a _partial_ node (Experiment.cost(model=, hardware=, parallel=)).
CALL_TIME_ARGUMENTS = {"cost": {"model", "hardware", "parallel"}}
# Constructors whose arguments are alternatives: a node gives exactly one of the sets (and none of the others).
ALTERNATIVES = {"omnisim.cluster.ClusterSpec": ({"prefill", "decode", "kv_link"}, {"mixed"})}


def option_groups() -> list[str]:
    """Every config group under conf/, nested ones too (e.g. ``cluster/group``), overlays left out."""
    groups = {str(p.parent.relative_to(CONF)) for p in CONF.rglob("*.yaml") if p.parent != CONF}
    return sorted(g for g in groups if g.split("/")[0] not in OVERLAY_GROUPS)


def group_options() -> list[tuple[str, str]]:
    """(group, option) for every option of every group."""
    return [(group, option) for group in option_groups() for option in config_options(group)]


def composed(group: str, option: str) -> dict:
    return compose_option(group, option)


def arguments(target: str) -> set[str]:
    cls = get_class(target)
    return {name for name, p in inspect.signature(cls).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_keys(node, where: str, group: str | None = None) -> None:
    """Assert that every node with a ``_target_`` under ``node`` has exactly its constructor's arguments as keys
    (less the call-time arguments of a ``_partial_`` node of ``group``; one set of ALTERNATIVES), and
    ``seed: ${seed}`` where the constructor takes a seed."""
    if isinstance(node, list):
        for k, child in enumerate(node):
            check_keys(child, f"{where}[{k}]", group)
        return
    if not isinstance(node, dict):
        return
    if "_target_" in node:
        target = node["_target_"]
        expected = arguments(target)
        if node.get("_partial_"):
            expected -= CALL_TIME_ARGUMENTS.get((group or "").split("/")[0], set())
        keys = set(node) - HYDRA_KEYS
        if target in ALTERNATIVES:
            given = [alt for alt in ALTERNATIVES[target] if keys & alt]
            assert len(given) == 1, f"{where}: {target} takes one of {ALTERNATIVES[target]}, got keys {sorted(keys)}"
            expected -= set().union(*ALTERNATIVES[target]) - given[0]
        assert keys == expected, (f"{where}: keys differ from {target}'s arguments: extra {sorted(keys - expected)}, "
                                  f"missing {sorted(expected - keys)}")
        if "seed" in expected:
            assert node["seed"] == "${seed}", f"{where}: seed must be ${{seed}}, got {node['seed']!r}"
    for key, value in node.items():
        if key not in HYDRA_KEYS:
            check_keys(value, f"{where}.{key}", group)
