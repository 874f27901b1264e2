"""``head4d.render.distortion_loss``: MipNeRF-360's distortion loss in its O(S) form against
the O(S^2) definition written out here (every pair of intervals, ``|m_i - m_j|`` taken
directly), in float64 on fresh random weights and sorted random interval edges: the value
and the gradients with respect to both inputs; float32 against the float64 definition;
hand-checked small cases; argument errors.
"""
import pytest
import torch

from head4d.render import distortion_loss

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def pairwise_definition(depths, weights):
    """The definition: ``sum_ij w_i w_j |m_i - m_j| + 1/3 sum_k w_k^2 (t_{k+1} - t_k)``."""
    mid = (depths[..., 1:] + depths[..., :-1]) / 2
    pairs = (weights[..., :, None] * weights[..., None, :] * (mid[..., :, None] - mid[..., None, :]).abs())
    return pairs.sum(dim=(-1, -2)) + (weights.square() * (depths[..., 1:] - depths[..., :-1])).sum(-1) / 3


def random_rays(shape, samples, dtype, seed):
    """Sorted edges ``[*shape, S + 1]`` in about [3.35, 4.65] (a camera 4 units away, a 1.3 box)
    with some repeated edges (zero-length intervals, as merged samples can give), and weights
    ``[*shape, S]`` in [0, 1) summing to at most 1 per ray."""
    gen = torch.Generator().manual_seed(seed)
    depths = 3.35 + 1.3 * torch.rand(*shape, samples + 1, generator=gen, dtype=torch.float64)
    depths = depths.sort(dim=-1).values
    if samples >= 3:
        depths[..., 3] = depths[..., 2]  # a zero-length interval
    weights = torch.rand(*shape, samples, generator=gen, dtype=torch.float64)
    weights = weights / weights.sum(-1, keepdim=True) * torch.rand(*shape, 1, generator=gen, dtype=torch.float64)
    return depths.to(dtype), weights.to(dtype)


@pytest.mark.parametrize("shape,samples", [((2, 7), 95), ((5,), 1), ((3, 2, 4), 16)])
def test_matches_pairwise_definition_float64(shape, samples):
    depths, weights = random_rays(shape, samples, torch.float64, seed=samples)
    depths.requires_grad_(True)
    weights.requires_grad_(True)
    got = distortion_loss(depths, weights)
    want = pairwise_definition(depths, weights)
    assert got.shape == tuple(shape) and got.dtype == torch.float64
    # sums of up to S terms (measured under 2 eps of the loss's scale at S = 95)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 64 * EPS64 * max(scale, 1e-3)
    cotangent = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_depths, g_weights = torch.autograd.grad((got * cotangent).sum(), [depths, weights])
    r_depths, r_weights = torch.autograd.grad((want * cotangent).sum(), [depths, weights])
    for g, r in ((g_depths, r_depths), (g_weights, r_weights)):
        assert (g - r).abs().max().item() <= 64 * EPS64 * max(r.abs().max().item(), 1e-3)
    assert r_weights.abs().max() > 0 and r_depths.abs().max() > 0


def test_float32_against_float64_definition():
    depths, weights = random_rays((4, 64), 95, torch.float64, seed=3)
    want = pairwise_definition(depths, weights)
    got = distortion_loss(depths.float(), weights.float()).double()
    # float32 prefix sums over 95 samples of midpoints shifted to the ray's start (measured
    # 2.2 eps; without the shift the depths' ~4 would cancel in m_i W_i - M_i)
    assert ((got - want).abs() / want.abs()).max().item() < 64 * EPS32


def test_small_cases_by_hand():
    t = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    # one interval holding all the weight: only the self term, w^2 * length / 3
    assert distortion_loss(t, torch.tensor([0.0, 0.6], dtype=torch.float64)).item() == pytest.approx(0.36 * 2 / 3)
    # two intervals, midpoints 0.5 and 2.0: 2 * 0.5 * 0.25 * 1.5 + (0.25 * 1 + 0.0625 * 2) / 3
    got = distortion_loss(t, torch.tensor([0.5, 0.25], dtype=torch.float64)).item()
    assert got == pytest.approx(2 * 0.5 * 0.25 * 1.5 + (0.25 + 0.0625 * 2) / 3, rel=1e-15)
    # zero weights, zero loss; the loss does not depend on where the ray starts
    assert distortion_loss(t, torch.zeros(2, dtype=torch.float64)).item() == 0
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    assert distortion_loss(t + 10, w).item() == pytest.approx(distortion_loss(t, w).item(), rel=1e-14)


def test_bad_arguments():
    t, w = torch.rand(2, 5), torch.rand(2, 4)
    with pytest.raises(ValueError, match="depths must have shape"):
        distortion_loss(t, torch.rand(2, 5))
    with pytest.raises(ValueError, match="depths must have shape"):
        distortion_loss(t, torch.rand(3, 4))
    with pytest.raises(TypeError, match="dtype"):
        distortion_loss(t, w.double())
    with pytest.raises(TypeError, match="weights must"):
        distortion_loss(t, [0.1, 0.2])
    with pytest.raises(TypeError, match="depths must have a dtype"):
        distortion_loss(torch.ones(2, 5, dtype=torch.int64), w)
