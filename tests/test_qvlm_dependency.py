"""Q-VLM cross-layer dependency mining: the entropy estimator on known answers, the partition."""

from __future__ import annotations

import math
import random

import pytest
import torch

from methods.qvlm.dependency import (PositionSampler, code_units, conditional_entropy, dependency,
                                     entropy, joint_distribution, level_range, mine_dependencies,
                                     partition, resolve_h0, soft_assign)


def _marginal_entropy(y, bits, tau):
    u, lo, hi = code_units(y, bits)
    return float(entropy(soft_assign(u, lo, hi, tau).mean(0)))


@pytest.mark.parametrize("bits", [4, 6])
def test_copy_has_near_zero_dependency(bits):
    x = torch.randn(2048, 64, generator=torch.Generator().manual_seed(0))
    h_y = _marginal_entropy(x, bits, 0.01)
    # the soft kernel leaves a small floor (documented), far below the marginal entropy ...
    assert float(dependency(x, x, bits, tau=0.01)) < 0.04 * h_y
    # ... which vanishes with the temperature
    assert float(dependency(x, x, bits, tau=1e-3)) < 0.01 * h_y
    # a deterministic function of the previous layer is a copy too (up to the grid)
    assert float(dependency(x, -x, bits, tau=1e-3)) < 0.01 * h_y


@pytest.mark.parametrize("bits", [4, 6])
def test_independent_layer_has_marginal_entropy(bits):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(2048, 64, generator=gen), torch.randn(2048, 64, generator=gen)
    h_y = _marginal_entropy(y, bits, 0.01)
    d = float(dependency(x, y, bits, tau=0.01))
    assert abs(d - h_y) < 0.01 * h_y
    # partial dependence lies strictly between
    mixed = float(dependency(x, x + 0.3 * y, bits, tau=0.01))
    assert 0.1 < mixed < 0.9 * h_y


def test_exact_on_levels():
    """Values on the quantization levels: hard answers, 0 and log(number of levels)."""
    lo, hi = level_range(4, True)
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(lo, hi + 1, (200000,), generator=gen).float()
    b = torch.randint(lo, hi + 1, (200000,), generator=gen).float()
    sa, sb = soft_assign(a, lo, hi, 0.01), soft_assign(b, lo, hi, 0.01)
    assert float(conditional_entropy(joint_distribution(sa, sa))) == pytest.approx(0, abs=1e-4)
    m = hi - lo + 1
    # plug-in bias of the joint histogram is about (m-1)^2 / 2N
    assert float(conditional_entropy(joint_distribution(sa, sb))) == pytest.approx(math.log(m), abs=2e-3)


def test_soft_assignment_is_a_distribution_and_differentiable():
    u = torch.tensor([-7.0, -0.5, 0.0, 0.3, 6.9], requires_grad=True)
    a = soft_assign(u, -7, 7, 0.01)
    assert torch.allclose(a.sum(1), torch.ones(5))
    assert int(a[2].argmax()) == 7 and int(a[3].argmax()) == 7
    conditional_entropy(joint_distribution(a, a.flip(0))).backward()
    assert torch.isfinite(u.grad).all()


def _check_partition(deps, h0, max_block, blocks):
    n = len(deps) + 1
    assert [i for b in blocks for i in b] == list(range(n))
    for b in blocks:
        assert 1 <= len(b) <= max_block
        assert b == list(range(b[0], b[-1] + 1))
        if len(b) > 1:  # Eq. 7 holds for the block and for each of its prefixes (greedy growth)
            for end in range(b[0] + 1, b[-1] + 1):
                assert sum(deps[b[0]:end]) > (end - b[0]) * h0
    for b, nxt in zip(blocks, blocks[1:]):
        if len(b) < max_block:  # maximal: the next layer would have broken the threshold
            assert not sum(deps[b[0]:nxt[0]]) > (nxt[0] - b[0]) * h0


@pytest.mark.parametrize("seed", range(20))
def test_partition_respects_size_and_threshold(seed):
    rng = random.Random(seed)
    deps = [rng.uniform(0, 3) for _ in range(rng.randint(1, 40))]
    max_block = rng.choice([1, 2, 3])
    h0 = resolve_h0(deps, "median") if seed % 2 else rng.uniform(0, 3)
    _check_partition(deps, h0, max_block, partition(deps, h0, max_block))


def test_partition_extremes():
    deps = [1.0] * 9
    assert partition(deps, 5.0) == [[i] for i in range(10)]
    assert partition(deps, 0.0) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert partition([], 0.0) == [[0]]
    assert resolve_h0([1.0, 3.0, 2.0], "median") == 2.0
    assert resolve_h0([1.0, 3.0, 2.0, 6.0], "mean") == 3.0
    assert resolve_h0([1.0, 3.0], "absolute", 0.25) == resolve_h0([1.0, 3.0], 0.25) == 0.25
    for rule, value in (("mode", None), ("absolute", None), ("absolute", float("nan")), ("absolute", True),
                        ("median", 0.5), ("mean", 0.5)):
        with pytest.raises(ValueError, match="h0"):
            resolve_h0([1.0], rule, value)


# six layers whose five adjacent dependencies all lie well above 0.8 nats
STRONG = [1.0, 1.2, 0.9, 1.1, 1.0]


def test_lower_dependency_gives_smaller_blocks_only_with_the_absolute_rule():
    """VEO's purpose (lower dependency -> smaller blocks) shows under a fixed threshold; the
    median and mean rules rescale with the dependencies and keep the blocks."""
    weak = [d / 2 for d in STRONG]  # every dependency halved (exact in binary floating point)
    absolute = [partition(d, resolve_h0(d, "absolute", 0.8)) for d in (STRONG, weak)]
    assert absolute == [[[0, 1, 2], [3, 4, 5]], [[0], [1], [2], [3], [4], [5]]]
    assert max(map(len, absolute[1])) < max(map(len, absolute[0]))
    for rule in ("median", "mean"):
        h_strong, h_weak = resolve_h0(STRONG, rule), resolve_h0(weak, rule)
        assert h_weak == h_strong / 2
        assert partition(weak, h_weak) == partition(STRONG, h_strong)


@pytest.mark.parametrize("seed", range(10))
def test_relative_rules_ignore_a_common_scale(seed):
    rng = random.Random(seed)
    deps = [rng.uniform(0, 3) for _ in range(rng.randint(2, 30))]
    for rule in ("median", "mean"):
        blocks = partition(deps, resolve_h0(deps, rule))
        for c in (0.5, 0.25, 4.0):  # powers of two: scaling is exact, so no near-tie can flip
            scaled = [c * d for d in deps]
            assert partition(scaled, resolve_h0(scaled, rule)) == blocks
    # the absolute rule at a threshold above every dependency scaled by 1/4: all singletons
    quarter = [d / 4 for d in deps]
    assert partition(quarter, resolve_h0(quarter, "absolute", 0.76)) == [[i] for i in range(len(deps) + 1)]


def test_position_sampler_uses_real_tokens_only():
    masks = [torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), torch.tensor([[0, 1, 1, 1]])]
    s = PositionSampler(masks, channels=8, n=40, seed=0)
    assert s.n == 40
    for m, idx in zip(masks, s.index):
        tokens = idx // 8
        assert m.reshape(-1)[tokens].bool().all()
    again = PositionSampler(masks, channels=8, n=40, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(s.index, again.index))
    everything = PositionSampler(masks, channels=8, n=10 ** 6, seed=0)
    assert everything.n == (6 + 3) * 8


def test_mine_dependencies_on_tiny_model(tiny_lm, tiny_calib):
    from harness.models.capture import capture_inputs
    from harness.models.layers import language_layers

    _, layers = language_layers(tiny_lm.model)
    inputs = list(tiny_calib.inputs())
    calls = capture_inputs(tiny_lm.model, layers[0], inputs)
    masks = [b["attention_mask"] for b in inputs]
    deps = mine_dependencies(layers, calls, masks, bits=4, n_samples=4096, seed=0)
    assert len(deps) == len(layers) - 1
    assert all(0 <= d <= math.log(15) + 1e-6 for d in deps)
    assert deps == mine_dependencies(layers, calls, masks, bits=4, n_samples=4096, seed=0)
