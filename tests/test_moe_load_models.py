"""Expert-load models, top-k routing and recorded load files."""
import numpy as np
import pytest

from omnisim.moe import (BurstyLoad, DriftingLoad, MixedLoad, RebalanceConfig, ReplayLoad, UniformLoad, ZipfLoad,
                         inclusion, logical_counts, read_load_matrix, route_counts, write_load_csv)

MODELS = {
    "uniform": lambda: UniformLoad(),
    "zipf": lambda: ZipfLoad(0.6, 0.2, seed=4),
    "drifting": lambda: DriftingLoad(0.6, 0.2, period_s=10.0, seed=4),
    "bursty": lambda: BurstyLoad(ZipfLoad(0.5, seed=4), rate_per_s=0.5, seed=4),
    "mixed": lambda: MixedLoad([ZipfLoad(0.6, seed=4), ZipfLoad(0.6, variant=1, seed=4)], [[1, 0], [0, 1]], 10.0),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_give_normalised_shares_constant_per_key_and_seeded(name):
    a, b = MODELS[name](), MODELS[name]()
    times = [0.0, 3.3, 12.0, 25.5, 40.0, 3.3]
    for t in times:
        s = a.shares(t, 6, 64)
        assert s.shape == (6, 64) and (s >= 0).all() and np.allclose(s.sum(axis=1), 1.0)
        assert np.array_equal(s, b.shares(t, 6, 64))
    for t in (0.0, 12.0, 25.5):  # equal keys promise equal shares
        for dt in (0.0, 0.01):
            if a.time_key(t + dt) == a.time_key(t):
                assert np.allclose(a.shares(t + dt, 6, 64), a.shares(t, 6, 64))


def test_zipf_skew_follows_the_exponent_with_independent_hot_sets():
    s = ZipfLoad(1.0, seed=1).shares(0, 4, 256)
    harmonic = (1.0 / np.arange(1, 257)).sum()
    assert np.allclose(np.sort(s, axis=1)[:, ::-1][:, 0], 1 / harmonic)
    assert len({int(np.argmax(row)) for row in s}) > 1  # per-layer hot sets
    assert np.allclose(ZipfLoad(0.0).shares(0, 2, 8), 1 / 8)
    assert not np.array_equal(ZipfLoad(0.6, variant=1).shares(0, 2, 64), ZipfLoad(0.6).shares(0, 2, 64))


def test_drifting_hot_set_changes_at_the_configured_rate():
    model = DriftingLoad(1.0, hot_set=8, changed_per_period=3, period_s=10.0, blend_steps=4, seed=2)
    hot = [set(np.argsort(-model.shares(k * 10.0, 3, 64)[0])[:8]) for k in range(4)]
    for before, after in zip(hot, hot[1:]):
        assert len(before - after) == 3
    # between changes the shares move in blend_steps steps: halfway is halfway
    start, end = model.shares(10.0, 3, 64), model.shares(20.0, 3, 64)
    assert np.allclose(model.shares(15.0, 3, 64), (start + end) / 2)
    with pytest.raises(ValueError, match="changed_per_period"):
        DriftingLoad(hot_set=4, changed_per_period=5)


def test_bursts_make_chosen_experts_hotter_for_their_duration():
    model = BurstyLoad(UniformLoad(), rate_per_s=0.05, duration_s=5.0, experts=2, boost=10.0, seed=3)
    grid = np.arange(0.0, 400.0, 0.25)
    active = np.array([np.subtract(*model._active(t))[()] for t in grid]) * -1  # bursts under way at each t
    assert (active == 0).any() and (active == 1).any()
    for t in grid[active == 0][:3]:
        assert np.allclose(model.shares(t, 2, 32), 1 / 32)
    one = grid[active == 1][0]
    row = np.sort(model.shares(one, 2, 32)[0])
    assert np.allclose(row[-2:], 10 / 50) and np.allclose(row[:-2], 1 / 50)  # 2 experts x10, renormalised
    assert np.allclose(model.shares(one + 0.1, 2, 32), model.shares(one, 2, 32)) or model.time_key(one + 0.1) != \
        model.time_key(one)


def test_mixed_load_follows_the_mix_schedule():
    a, b = ZipfLoad(0.8, seed=1), ZipfLoad(0.8, variant=1, seed=1)
    mix = MixedLoad([a, b], [[1.0, 0.0], [0.5, 0.5]], segment_s=10.0)
    assert np.allclose(mix.shares(5.0, 2, 16), a.shares(0, 2, 16))
    assert np.allclose(mix.shares(15.0, 2, 16), (a.shares(0, 2, 16) + b.shares(0, 2, 16)) / 2)
    assert np.allclose(mix.shares(25.0, 2, 16), a.shares(0, 2, 16))
    with pytest.raises(ValueError, match="one per component"):
        MixedLoad([a, b], [[1.0, 0.0, 0.0]])


def test_inclusion_caps_each_expert_at_one_pick_per_token():
    pi = inclusion(np.array([[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1], [0.25] * 4]), 2)
    assert np.allclose(pi, [[1, 1 / 3, 1 / 3, 1 / 3], [1.0, 0.6, 0.2, 0.2], [0.5] * 4], atol=1e-6)
    big = inclusion(ZipfLoad(1.2, seed=0).shares(0, 3, 256), 8)
    assert np.allclose(big.sum(axis=1), 8) and big.max() <= 1 + 1e-12
    with pytest.raises(ValueError, match="top_k"):
        inclusion(np.ones((1, 4)), 5)


def test_routed_counts_match_the_model_on_average():
    picks = inclusion(ZipfLoad(0.8, seed=0).shares(0, 4, 64), 8)
    counts = route_counts(np.random.default_rng(0), picks, 500, samples=200)
    assert counts.shape == (200, 4, 64) and (counts <= 500).all()
    assert np.allclose(counts.mean(axis=0), 500 * picks, rtol=0.1, atol=3)
    assert abs(counts.sum(axis=2).mean() - 500 * 8) < 10


def test_load_files_round_trip_and_bad_lines_are_named(tmp_path):
    counts = np.arange(24, dtype=float).reshape(2, 3, 4)
    write_load_csv(tmp_path / "w.csv", counts)
    assert np.array_equal(read_load_matrix(tmp_path / "w.csv"), counts)
    write_load_csv(tmp_path / "one.csv", counts[0])
    assert np.array_equal(read_load_matrix(tmp_path / "one.csv"), counts[0])
    np.save(tmp_path / "w.npy", counts)
    assert np.array_equal(read_load_matrix(tmp_path / "w.npy"), counts)
    (tmp_path / "bad.csv").write_text("layer_id,expert_id,count\n0,0,5\n0,1,many\n")
    with pytest.raises(ValueError, match="bad.csv line 3"):
        read_load_matrix(tmp_path / "bad.csv")
    (tmp_path / "cols.csv").write_text("layer,expert_id,count\n0,0,5\n")
    with pytest.raises(ValueError, match="missing layer_id"):
        read_load_matrix(tmp_path / "cols.csv")
    with pytest.raises(ValueError, match="does not exist"):
        read_load_matrix(tmp_path / "nope.npy")
    np.save(tmp_path / "neg.npy", -counts)
    with pytest.raises(ValueError, match="non-negative"):
        read_load_matrix(tmp_path / "neg.npy")


def test_physical_counts_map_to_logical_experts():
    phy2log = np.array([[0, 1, 2, 0], [2, 1, 0, 1]])
    physical = np.array([[[5.0, 1, 2, 3], [1, 2, 3, 4]]])
    assert logical_counts(physical, phy2log, 3).tolist() == [[[8, 1, 2], [3, 6, 1]]]


def test_replay_walks_the_recorded_windows(tmp_path):
    counts = np.zeros((3, 2, 4))
    for w in range(3):
        counts[w, :, w] = 10.0
    np.save(tmp_path / "load.npy", counts)
    replay = ReplayLoad(str(tmp_path / "load.npy"), window_s=5.0)
    assert [int(np.argmax(replay.shares(t, 2, 4)[0])) for t in (0, 6, 11, 16)] == [0, 1, 2, 0]
    held = ReplayLoad(str(tmp_path / "load.npy"), window_s=5.0, loop=False)
    assert int(np.argmax(held.shares(100.0, 2, 4)[0])) == 2
    with pytest.raises(ValueError, match="load.npy has 2 layers x 4 experts"):
        replay.shares(0.0, 3, 4)


def test_rebalance_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="period_s or period_steps"):
        RebalanceConfig(period_s=10, period_steps=100)
    with pytest.raises(ValueError, match="moves_per_rank_per_step"):
        RebalanceConfig(moves_per_rank_per_step=-1)
    with pytest.raises(ValueError, match="window_steps or window_s"):
        RebalanceConfig(period_steps=100)
    assert RebalanceConfig(period_s=30).window_seconds == 30
