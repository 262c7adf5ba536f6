"""backends/vllm/eplb.py: vLLM's EPLB policy interface answered by omnisim policies."""
import numpy as np
import pytest

from backends.vllm.eplb import eplb_policy_class, logical_to_physical, rebalance_experts
from omnisim.moe import ZipfLoad
from omnisim.policies.placement import DeepSeekEplb, OmniPlacement, StaticPlacement
from omnisim.policies.placement.deepseek_eplb import rebalance_experts as deepseek_reference

WEIGHT = ZipfLoad(0.8, seed=5).shares(0, 3, 64) * 1e4   # 3 layers x 64 experts


def test_answers_in_vllms_shape_with_consistent_maps():
    phy2log, log2phy, logcnt = rebalance_experts(OmniPlacement(), WEIGHT, 72, 4, 2, 8)
    assert phy2log.shape == (3, 72) and logcnt.shape == (3, 64) and log2phy.shape[:2] == (3, 64)
    assert (logcnt.sum(axis=1) == 72).all()
    for layer in range(3):
        for expert in range(64):
            slots = log2phy[layer, expert][log2phy[layer, expert] >= 0]
            assert len(slots) == logcnt[layer, expert] and (phy2log[layer, slots] == expert).all()


def test_deepseek_policy_through_the_adapter_equals_the_reference():
    phy2log, _, logcnt = rebalance_experts(DeepSeekEplb(), WEIGHT, 72, 4, 2, 8)
    ref_phy2log, _, ref_logcnt = deepseek_reference(WEIGHT, 72, 4, 2, 8)
    assert np.array_equal(phy2log, ref_phy2log) and np.array_equal(logcnt, ref_logcnt)


def test_current_map_reaches_the_policy():
    # OmniPlacement keeps layers already balanced: the current map must be the one vLLM passes
    current, _, _ = rebalance_experts(OmniPlacement(), WEIGHT, 72, 1, 1, 8)
    again, _, _ = rebalance_experts(OmniPlacement(), WEIGHT, 72, 1, 1, 8, old_global_expert_indices=current)
    assert np.array_equal(again, current)


def test_policy_class_remembers_its_last_map_and_returns_what_is_asked():
    cls = eplb_policy_class(OmniPlacement(), returns="phy2log")
    first = cls.rebalance_experts(WEIGHT, 72, 1, 1, 8)
    assert first.shape == (3, 72) and np.array_equal(cls.last_phy2log, first)
    assert np.array_equal(cls.rebalance_experts(WEIGHT, 72, 1, 1, 8), first)  # no old map: its own last one
    triple = eplb_policy_class(StaticPlacement(), returns="triple").rebalance_experts(WEIGHT, 72, 1, 1, 8)
    assert len(triple) == 3
    with pytest.raises(ValueError, match="returns"):
        eplb_policy_class(StaticPlacement(), returns="both")


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        rebalance_experts(StaticPlacement(), WEIGHT, 70, 1, 1, 8)
    with pytest.raises(ValueError, match="old_global_expert_indices has shape"):
        rebalance_experts(StaticPlacement(), WEIGHT, 72, 1, 1, 8, old_global_expert_indices=np.zeros((3, 64)))


def test_log2phy_by_hand():
    log2phy, logcnt = logical_to_physical(np.array([[2, 0, 2, 1, 0, 2]]), 3)
    assert logcnt.tolist() == [[2, 1, 3]]
    assert log2phy.tolist() == [[[1, 4, -1], [3, -1, -1], [0, 2, 5]]]


README_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                 [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]   # deepseek-ai/EPLB's example


def test_matches_vllm_default_policy_on_recorded_tensors():
    torch = pytest.importorskip("torch")
    policy_pkg = pytest.importorskip("vllm.distributed.eplb.policy")
    default = policy_pkg.DefaultEplbPolicy
    for weight, shape in ((torch.tensor(README_WEIGHT), (16, 4, 2, 8)),
                          (torch.tensor(WEIGHT, dtype=torch.float32), (72, 4, 2, 8)),
                          (torch.tensor(WEIGHT, dtype=torch.float32), (72, 1, 1, 8))):
        theirs = default.rebalance_experts(weight, *shape)
        theirs = theirs[0] if isinstance(theirs, tuple) else theirs
        ours = rebalance_experts(DeepSeekEplb(), weight, *shape)[0]
        assert isinstance(ours, torch.Tensor) and torch.equal(ours, theirs.to(ours.device))
    cls = eplb_policy_class(OmniPlacement())
    assert issubclass(cls, policy_pkg.AbstractEplbPolicy)
    old = torch.tensor(rebalance_experts(StaticPlacement(), WEIGHT, 72, 1, 1, 8)[0])
    out = cls.rebalance_experts(torch.tensor(WEIGHT, dtype=torch.float32), 72, 1, 1, 8, old)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (3, 72) and out.dtype == torch.int64


def test_install_replaces_vllms_default_policy():
    policy_pkg = pytest.importorskip("vllm.distributed.eplb.policy")
    from backends.vllm.eplb import install

    saved = dict(policy_pkg.EPLB_POLICIES)
    try:
        cls = install(OmniPlacement())
        assert policy_pkg.EPLB_POLICIES["default"] is cls and cls.policy.ratio_threshold == 1.1
    finally:
        policy_pkg.EPLB_POLICIES.clear()
        policy_pkg.EPLB_POLICIES.update(saved)
