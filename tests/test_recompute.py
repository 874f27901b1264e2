"""Recomputation in the backward (``head4d.nn._recompute``) and the layers that take it in
training: StyleGAN2's synthesis and to-RGB layers (modulated convolution + bias_act) and
the Mix-FFN. Each recomputing path is checked against an independent plain composition
with the same random weights (float64): the output, the gradient of every input, a
second derivative (path-length regularization differentiates the synthesis twice), and
what autograd keeps for the backward (only the inputs)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import head4d
from head4d import _backend
from head4d.nn._recompute import recompute, recompute_wanted

CPU = torch.device("cpu")
#: float64 forward / backward of the same ops in the same order: rounding only.
TOL = dict(rtol=1e-10, atol=1e-12)


def _saved_storages(fn):
    """(result of fn(), {storage key: nbytes} of what the forward saved for the backward)."""
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if torch._C._current_autograd_node() is None:
            saved[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _key(t):
    return (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())


def _leaves(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_(True) for s in shapes]


def _mlp(x, w1, b1, w2):
    return torch.tanh(x @ w1 + b1) @ w2


def test_recompute_matches_the_plain_function_and_keeps_only_its_inputs():
    x, w1, b1, w2 = _leaves((6, 5), (5, 7), (7,), (7, 3))
    plain = _mlp(x, w1, b1, w2)
    grads_plain = torch.autograd.grad(plain.square().sum(), [x, w1, b1, w2])
    out, saved = _saved_storages(lambda: recompute(_mlp, x, w1, b1, w2))
    torch.testing.assert_close(out, plain, **TOL)
    grads = torch.autograd.grad(out.square().sum(), [x, w1, b1, w2])
    for g, e in zip(grads, grads_plain):
        torch.testing.assert_close(g, e, **TOL)
    # the forward keeps the four inputs (leaves) and the square's input (the output) only
    assert set(saved) <= {_key(t) for t in (x, w1, b1, w2, out)}
    _, plain_saved = _saved_storages(lambda: _mlp(x, w1, b1, w2).square().sum())
    assert set(plain_saved) - {_key(t) for t in (x, w1, b1, w2)}  # the plain one keeps its tanh too


def test_recompute_is_twice_differentiable():
    x, w1, b1, w2 = _leaves((4, 3), (3, 5), (5,), (5, 2), seed=1)
    assert torch.autograd.gradcheck(lambda *t: recompute(_mlp, *t), (x, w1, b1, w2))
    assert torch.autograd.gradgradcheck(lambda *t: recompute(_mlp, *t), (x, w1, b1, w2))
    # a second derivative through an input's history (the path a penalty takes)
    h = x * 2.0
    (gx,) = torch.autograd.grad(recompute(_mlp, h, w1, b1, w2).sum(), h, create_graph=True)
    (gx_plain,) = torch.autograd.grad(_mlp(h, w1, b1, w2).sum(), h, create_graph=True)
    got = torch.autograd.grad(gx.square().sum(), [x, w1, b1], retain_graph=True)  # h is shared
    expected = torch.autograd.grad(gx_plain.square().sum(), [x, w1, b1])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)


def test_recompute_gives_gradients_only_where_asked_and_passes_none_through():
    x, w1, b1, w2 = _leaves((4, 3), (3, 5), (5,), (5, 2), seed=2)
    frozen = w2.detach()
    out = recompute(lambda x, w1, b1, w2, unused: _mlp(x, w1, b1, w2), x, w1, b1, frozen, None)
    gx, gb = torch.autograd.grad(out.sum(), [x, b1])
    ex, eb = torch.autograd.grad(_mlp(x, w1, b1, frozen).sum(), [x, b1])
    torch.testing.assert_close(gx, ex, **TOL)
    torch.testing.assert_close(gb, eb, **TOL)


def test_recompute_runs_the_backward_in_the_forwards_backend_scope_and_autocast():
    scopes = []

    def fn(x):
        scopes.append((_backend._SCOPED_BACKEND.get(), torch.is_autocast_enabled("cpu")))
        return x.square()

    x = torch.randn(3, requires_grad=True)
    with _backend.backend_scope("cpu"):
        out = recompute(fn, x)
    out.sum().backward()
    assert scopes == [("cpu", False), ("cpu", False)]
    # under autocast the recomputed matmul is bfloat16 again: the gradient is the plain one's
    a, b = torch.randn(8, 8, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = recompute(torch.matmul, a, b)
        plain = torch.matmul(a, b)
    assert got.dtype == plain.dtype == torch.bfloat16
    got_grads = torch.autograd.grad(got.float().sum(), [a, b])
    plain_grads = torch.autograd.grad(plain.float().sum(), [a, b])
    for g, e in zip(got_grads, plain_grads):
        assert torch.equal(g, e)


def test_recompute_wanted_only_when_autograd_records_off_the_references(monkeypatch):
    monkeypatch.delenv("HEAD4D_BACKEND", raising=False)
    x, y = torch.randn(2, requires_grad=True), torch.randn(2)
    assert recompute_wanted(None, x, None)
    assert recompute_wanted("cpu", y, x)
    assert not recompute_wanted(None, y, None)  # nothing requires grad
    with torch.no_grad():
        assert not recompute_wanted(None, x)
    assert not recompute_wanted("torch", x)  # the references' path stays as it is
    with _backend.backend_scope("torch"):
        assert not recompute_wanted(None, x)
        assert recompute_wanted("cpu", x)  # an explicit backend= wins over the scope
    monkeypatch.setenv("HEAD4D_BACKEND", "torch")
    assert not recompute_wanted(None, x)


# ------------------------------------------------------------------ the layers

def _randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + 0.1)
    return module


def _plain_modulated_conv(x, weight, styles, *, demodulate, up=1, padding=0, f=None):
    """StyleGAN2's modulated convolution written out (per-sample weights, a grouped conv)."""
    n, i = styles.shape
    o = weight.shape[0]
    w = weight.unsqueeze(0) * styles.reshape(n, 1, i, 1, 1)
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt().reshape(n, o, 1, 1, 1)
    w = w.reshape(n * o, i, *weight.shape[2:])
    xg = x.reshape(1, n * i, *x.shape[2:])
    if up == 1:
        y = F.conv2d(xg, w, padding=padding, groups=n)
    else:  # zeros after each sample, pad by the filter's share, filter times up^2, then a true conv
        fw = f.shape[-1]
        z = torch.zeros(1, n * i, x.shape[2] * up, x.shape[3] * up, dtype=x.dtype)
        z[:, :, ::up, ::up] = xg
        p0, p1 = padding + (fw + up - 1) // 2, padding + (fw - up) // 2
        z = F.pad(z, [p0, p1, p0, p1])
        z = F.conv2d(z, (f * up * up).flip([0, 1]).expand(n * i, 1, fw, fw), groups=n * i)
        y = F.conv2d(z, w.flip([2, 3]), groups=n)
    return y.reshape(n, o, *y.shape[2:])


def _plain_lrelu(x, bias, gain, clamp):
    y = F.leaky_relu(x + bias.reshape(1, -1, 1, 1), 0.2) * gain
    return y if clamp is None else y.clamp(-clamp, clamp)


@pytest.mark.parametrize("up", [1, 2])
def test_synthesis_layer_recomputes_and_matches_a_plain_composition(up):
    torch.manual_seed(3)
    layer = _randomize(head4d.nn.SynthesisLayer(4, 5, w_dim=6, resolution=8, up=up, conv_clamp=1.5), 3)
    layer = layer.double().train()
    x = torch.randn(2, 4, 8 // up, 8 // up, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    params = [layer.weight, layer.bias, layer.affine.weight, layer.affine.bias]
    out, saved = _saved_storages(lambda: layer(x, w, noise_mode="none", fused_modconv=False))

    styles = F.linear(w, layer.affine.weight * layer.affine.weight_gain, layer.affine.bias * layer.affine.bias_gain)
    plain = _plain_modulated_conv(x, layer.weight, styles, demodulate=True, up=up, padding=1,
                                  f=layer.resample_filter.double())
    plain = _plain_lrelu(plain, layer.bias, 2 ** 0.5, 1.5)
    assert 0.05 < (plain.abs() >= 1.5).double().mean() < 0.95  # the clamp acts on some, not all
    torch.testing.assert_close(out, plain, **TOL)
    cotangent = torch.randn_like(plain)
    got = torch.autograd.grad(out, [x, w] + params, cotangent)
    expected = torch.autograd.grad(plain, [x, w] + params, cotangent)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)
    # kept for the backward: x and w's affine (styles), no map of the output's size
    big = [n for n in saved.values() if n >= out.numel() * out.element_size()]
    assert not big, big


def test_torgb_layer_recomputes_and_matches_a_plain_composition():
    layer = _randomize(head4d.nn.stylegan2.ToRGBLayer(4, 3, w_dim=6, conv_clamp=0.8), 4).double().train()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    out, saved = _saved_storages(lambda: layer(x, w, fused_modconv=False))
    styles = F.linear(w, layer.affine.weight * layer.affine.weight_gain,
                      layer.affine.bias * layer.affine.bias_gain) * layer.weight_gain
    plain = _plain_modulated_conv(x, layer.weight, styles, demodulate=False)
    plain = (plain + layer.bias.reshape(1, -1, 1, 1)).clamp(-0.8, 0.8)
    torch.testing.assert_close(out, plain, **TOL)
    params = [x, w, layer.weight, layer.bias, layer.affine.weight, layer.affine.bias]
    for g, e in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(plain.square().sum(), params)):
        torch.testing.assert_close(g, e, **TOL)
    assert _key(x) in saved and not [n for k, n in saved.items() if k != _key(x) and n >= x.numel() * 8]


def test_synthesis_layer_second_derivative_matches_the_plain_path():
    """Path-length regularization's double backward: d/dparams of |d(out . c)/dw|^2."""
    layer = _randomize(head4d.nn.SynthesisLayer(3, 4, w_dim=5, resolution=6), 5).double().train()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    params = [layer.weight, layer.bias, layer.affine.weight]

    def penalty(backend):
        layer.backend = backend
        (gw,) = torch.autograd.grad((layer(x, w, noise_mode="const", fused_modconv=False) * c).sum(), w,
                                    create_graph=True)
        return torch.autograd.grad(gw.square().sum(), params)

    got, expected = penalty("cpu"), penalty("torch")  # cpu recomputes, torch does not
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


def test_mix_ffn_recomputes_and_matches_a_plain_composition():
    ffn = _randomize(head4d.nn.MixFFN(6, 12), 6).double()
    x = torch.randn(2, 4 * 3, 6, dtype=torch.float64, requires_grad=True)
    out, saved = _saved_storages(lambda: ffn(x, 4, 3))
    hidden = F.linear(x, ffn.fc1.weight, ffn.fc1.bias).transpose(1, 2).reshape(2, 12, 4, 3)
    hidden = F.conv2d(hidden, ffn.dwconv.dwconv.weight, ffn.dwconv.dwconv.bias, padding=1, groups=12)
    plain = F.linear(F.gelu(hidden.reshape(2, 12, 12).transpose(1, 2)), ffn.fc2.weight, ffn.fc2.bias)
    torch.testing.assert_close(out, plain, **TOL)
    params = [x] + list(ffn.parameters())
    cotangent = torch.randn_like(plain)
    for g, e in zip(torch.autograd.grad(out, params, cotangent), torch.autograd.grad(plain, params, cotangent)):
        torch.testing.assert_close(g, e, **TOL)
    assert set(saved) <= {_key(t) for t in params}  # no hidden map
    with _backend.backend_scope("torch"):  # the references' path keeps its hidden maps
        _, saved_ref = _saved_storages(lambda: ffn(x, 4, 3))
    assert len(set(saved_ref) - {_key(t) for t in params}) >= 3
