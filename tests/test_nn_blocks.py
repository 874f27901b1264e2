"""``head4d.nn``: every block against an independent plain-PyTorch composition written
here (explicit softmax attention, explicit LayerNorm / GELU / LeakyReLU, NCHW convs) in
float64 with the module's weights; the zero-initialized cross-attention, the motion
scale (0, per sample), spatial reduction, gradients, the attention backend, NVTX
ranges, errors and the upstream parameter renaming. Small dims: dim 64, 2 heads of 32,
8 x 8 token grids, 4 motion tokens."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import head4d
import head4d.nn as hnn
from head4d import _nvtx

from conftest import require_backend

DIM, HEADS, CTX, LM = 64, 2, 48, 4


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def randomize(module, seed=0, std=0.2):
    """Non-trivial weights everywhere (the zero output projection included), so every
    path of the block matters in the comparisons."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0  # LayerNorm gains near 1
            p.copy_(torch.randn(p.shape, generator=gen) * std + offset)
    return module


def inputs(b=2, h=8, w=8, dim=DIM, lm=LM, ctx=CTX, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h * w, dim, generator=gen)
    m = torch.randn(b, lm, ctx, generator=gen)
    return x, m


# ----------------------------------------------------------------------------------
# the independent reference, float64
# ----------------------------------------------------------------------------------

def P(t):
    """A tensor as a float64 constant; a float64 tensor (a float64 copy's parameter)
    passes through, so gradients reach it."""
    return t if t.dtype == torch.float64 else t.detach().double()


def r_linear(x, lin):
    y = x @ P(lin.weight).T
    return y + P(lin.bias) if lin.bias is not None else y


def r_layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * P(ln.weight) + P(ln.bias)


def r_softmax_attention(q, k, v):
    """``[B, H, Lq, D]`` x ``[B, H, Lk, D]``: explicit max-subtracted softmax."""
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    return torch.einsum("bhqk,bhkd->bhqd", e / e.sum(-1, keepdim=True), v)


def r_heads(t, heads):
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)


def r_merge(t):
    b, h, n, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(b, n, h * d)


def r_mha(mod, xq, xkv):
    c = mod.dim
    q = r_linear(xq, mod.q)
    kv = r_linear(xkv, mod.kv)
    k, v = kv[..., :c], kv[..., c:]
    out = r_softmax_attention(r_heads(q, mod.num_heads), r_heads(k, mod.num_heads), r_heads(v, mod.num_heads))
    return r_linear(r_merge(out), mod.proj)


def r_to_nchw(x, h, w):
    b, n, c = x.shape
    return x.transpose(1, 2).reshape(b, c, h, w).contiguous()


def r_self_attention(mod, x, h, w):
    src = x
    if mod.sr_ratio > 1:
        red = F.conv2d(r_to_nchw(x, h, w), P(mod.sr.weight), P(mod.sr.bias), stride=mod.sr_ratio)
        src = r_layer_norm(red.flatten(2).transpose(1, 2), mod.norm)
    return r_mha(mod, x, src)


def r_cross_attention(mod, x, ctx):
    return r_mha(mod, x, ctx)


def r_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def r_mixffn(mod, x, h, w):
    y = r_linear(x, mod.fc1)
    conv = mod.dwconv.dwconv  # the released name: mlp.dwconv.dwconv
    y = F.conv2d(r_to_nchw(y, h, w), P(conv.weight), P(conv.bias), padding=1, groups=mod.hidden)
    y = y.flatten(2).transpose(1, 2)
    return r_linear(r_gelu(y), mod.fc2)


def r_block(blk, x, h, w, motion=None, scale=1.0):
    x = x.double()  # not detached: the input-gradient test differentiates the reference
    if blk.cross_attn is not None and motion is not None:
        s = scale.double().reshape(-1, 1, 1) if isinstance(scale, torch.Tensor) else scale
        x = x + s * r_cross_attention(blk.cross_attn, r_layer_norm(x, blk.norm_cross), motion.double())
    x = x + r_self_attention(blk.attn, r_layer_norm(x, blk.norm_attn), h, w)
    return x + r_mixffn(blk.mlp, r_layer_norm(x, blk.norm_mlp), h, w)


def r_patch_embed(mod, img):
    y = F.conv2d(P(img), P(mod.proj.weight), P(mod.proj.bias), stride=2, padding=1)
    return r_layer_norm(y.flatten(2).transpose(1, 2), mod.norm), tuple(y.shape[2:])


def r_motion_tokens(mod, m):
    y = P(m)
    for layer in mod.mlp:
        if isinstance(layer, torch.nn.Linear):
            y = r_linear(y, layer)
        else:
            y = torch.where(y >= 0, y, y * mod.negative_slope)
    y = r_linear(y, mod.proj)
    return y.reshape(m.shape[0], mod.num_tokens, mod.token_dim)


TOL = 2e-5  # float32 module against the float64 reference (relative Frobenius norm)


# ----------------------------------------------------------------------------------
# each module against the reference
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sr,h,w", [(1, 8, 8), (2, 8, 8), (2, 5, 6), (4, 8, 8)])
def test_attention_matches_reference(sr, h, w):
    torch.manual_seed(0)
    mod = hnn.Attention(DIM, HEADS, sr_ratio=sr)
    x, _ = inputs(h=h, w=w)
    out = mod(x, h, w)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, r_self_attention(mod, P(x), h, w)) < TOL
    if sr == 1:
        assert mod.sr is None and mod.norm is None


def test_spatial_reduction_shapes(monkeypatch):
    """sr 2 on an 8 x 8 grid: 64 queries over 16 keys (Lq = 4 Lk); sr 1: Lq = Lk."""
    seen = []
    real = head4d.ops.attention

    def spy(q, k, v, **kw):
        seen.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(head4d.ops, "attention", spy)
    x, _ = inputs(b=3)
    hnn.Attention(DIM, HEADS, sr_ratio=2)(x, 8, 8)
    hnn.Attention(DIM, HEADS)(x, 8, 8)
    assert seen[0] == ((3, HEADS, 64, 32), (3, HEADS, 16, 32), (3, HEADS, 16, 32))
    assert seen[0][0][2] == 4 * seen[0][1][2]
    assert seen[1] == ((3, HEADS, 64, 32),) * 3
    assert hnn.Attention(DIM, HEADS, sr_ratio=2).reduced_grid(8, 8) == (4, 4)


def test_cross_attention_matches_reference():
    torch.manual_seed(0)
    mod = randomize(hnn.CrossAttention(DIM, CTX, HEADS), std=0.1)
    x, m = inputs()
    out = mod(x, m)
    assert out.shape == x.shape
    assert rel_err(out, r_cross_attention(mod, P(x), P(m))) < TOL
    # any number of query tokens: no grid involved
    out = mod(x[:, :7], m[:, :1])
    assert rel_err(out, r_cross_attention(mod, P(x[:, :7]), P(m[:, :1]))) < TOL


def test_cross_attention_output_projection_zero_at_init():
    mod = hnn.CrossAttention(DIM, CTX, HEADS)
    assert torch.count_nonzero(mod.proj.weight) == 0 and torch.count_nonzero(mod.proj.bias) == 0
    assert torch.count_nonzero(mod.q.weight) > 0 and torch.count_nonzero(mod.kv.weight) > 0
    x, m = inputs()
    assert torch.count_nonzero(mod(x, m)) == 0


def test_mixffn_matches_reference():
    torch.manual_seed(0)
    mod = hnn.MixFFN(DIM, 2 * DIM)
    with torch.no_grad():
        mod.dwconv.dwconv.bias.normal_()
        mod.fc1.bias.normal_()
    x, _ = inputs(h=5, w=7)
    out = mod(x, 5, 7)
    assert out.shape == x.shape
    assert rel_err(out, r_mixffn(mod, P(x), 5, 7)) < TOL


@pytest.mark.parametrize("scale", [1.0, 0.5, "tensor"])
def test_block_with_cross_attention_matches_reference(scale):
    torch.manual_seed(0)
    blk = randomize(hnn.TransformerBlock(DIM, HEADS, context_dim=CTX, mlp_ratio=2), std=0.1)
    x, m = inputs(b=3)
    if scale == "tensor":
        scale = torch.tensor([1.0, 0.0, 0.3])
    out = blk(x, 8, 8, m, scale)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, r_block(blk, x, 8, 8, m, scale)) < TOL


@pytest.mark.parametrize("sr", [1, 2])
def test_block_without_cross_attention_matches_reference(sr):
    torch.manual_seed(0)
    blk = randomize(hnn.TransformerBlock(DIM, HEADS, mlp_ratio=1.5, sr_ratio=sr), std=0.1)
    assert blk.cross_attn is None and blk.norm_cross is None and not blk.has_cross_attention
    assert blk.mlp.hidden == 96
    x, _ = inputs()
    out = blk(x, 8, 8)
    assert rel_err(out, r_block(blk, x, 8, 8)) < TOL


def test_patch_embed_matches_reference():
    torch.manual_seed(0)
    mod = hnn.PatchEmbed(5, DIM)
    with torch.no_grad():
        mod.norm.weight.normal_()
        mod.norm.bias.normal_()
    img = torch.randn(2, 5, 15, 16)
    tokens, grid = mod(img)
    ref, ref_grid = r_patch_embed(mod, img)
    assert grid == ref_grid == (8, 8) == hnn.PatchEmbed.output_grid(15, 16)
    assert all(type(g) is int for g in grid)
    assert tokens.shape == (2, 64, DIM)
    assert rel_err(tokens, ref) < TOL
    # channels-last input gives the same tokens
    tokens_cl, _ = mod(img.contiguous(memory_format=torch.channels_last))
    assert rel_err(tokens_cl, ref) < TOL


def test_motion_tokens_matches_reference():
    torch.manual_seed(0)
    mod = hnn.MotionTokens(in_dim=36, hidden=32, num_tokens=LM, token_dim=CTX)
    with torch.no_grad():
        for layer in mod.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 0.3)
                layer.bias.normal_(0, 0.3)
    m = torch.randn(3, 36)
    out = mod(m)
    assert out.shape == (3, LM, CTX)
    assert rel_err(out, r_motion_tokens(mod, m)) < TOL
    # token-major layout: token t is proj outputs [t * token_dim, (t + 1) * token_dim)
    flat = mod.proj(mod.mlp(m))
    assert torch.equal(out[:, 2], flat[:, 2 * CTX:3 * CTX])


def test_motion_tokens_portrait4d_shapes():
    assert hnn.MOTION_DIM == 548 and hnn.FLAME_MOTION_DIM == 109
    with torch.device("meta"):  # shapes only (a meta forward costs seconds of one-time set-up)
        mod = hnn.MotionTokens()
    assert (mod.num_tokens, mod.token_dim) == (64, 1024)
    shapes = {k: tuple(v.shape) for k, v in mod.state_dict().items()}
    assert shapes == {"mlp.0.weight": (512, 548), "mlp.0.bias": (512,), "mlp.2.weight": (512, 512),
                      "mlp.2.bias": (512,), "proj.weight": (64 * 1024, 512), "proj.bias": (64 * 1024,)}
    assert all(isinstance(mod.mlp[i], torch.nn.LeakyReLU) and mod.mlp[i].negative_slope == 0.01 for i in (1, 3))


def test_portrait4d_block_shapes():
    with torch.device("meta"):
        blk = hnn.TransformerBlock(1024, 4, context_dim=1024, mlp_ratio=2)
        dec = hnn.TransformerBlock(1024, 2, mlp_ratio=2, sr_ratio=2)
    assert blk.attn.head_dim == 256 and dec.attn.head_dim == 512
    assert blk.mlp.hidden == 2048 and dec.attn.sr.weight.shape == (1024, 1024, 2, 2)
    assert blk.cross_attn.kv.weight.shape == (2048, 1024)


# ----------------------------------------------------------------------------------
# zero init, motion scale
# ----------------------------------------------------------------------------------

def test_block_cross_branch_exactly_zero_at_init():
    torch.manual_seed(0)
    blk = hnn.TransformerBlock(DIM, HEADS, context_dim=CTX)
    x, m = inputs()
    branch = blk.cross_attn(blk.norm_cross(x), m)
    assert torch.count_nonzero(branch) == 0
    assert torch.equal(blk(x, 8, 8, m), blk(x, 8, 8, None, 0.0))


def _plain_copy(blk):
    """A block without cross-attention holding ``blk``'s other weights."""
    plain = hnn.TransformerBlock(DIM, HEADS)
    missing, unexpected = plain.load_state_dict(blk.state_dict(), strict=False)
    assert not missing and all(k.startswith(("cross_attn.", "norm_cross.")) for k in unexpected)
    return plain


def _grads(module, out, g):
    module.zero_grad(set_to_none=True)
    (out * g).sum().backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()}


def test_scale_zero_switches_cross_attention_off():
    torch.manual_seed(0)
    blk = randomize(hnn.TransformerBlock(DIM, HEADS, context_dim=CTX), std=0.1)
    plain = _plain_copy(blk)
    x, m = inputs(b=3)
    g = torch.randn(3, 64, DIM)
    expected = plain(x, 8, 8)
    m = m.requires_grad_(True)
    # a zero tensor: computed, multiplied by 0, exactly the plain block, zero gradients
    out_t = blk(x, 8, 8, m, torch.zeros(3))
    assert torch.equal(out_t, expected)
    grads_t = _grads(blk, out_t, g)
    grads_plain = _grads(plain, plain(x, 8, 8), g)
    for name, grad in grads_t.items():
        assert grad is not None, name
        if name.startswith(("cross_attn.", "norm_cross.")):
            assert torch.count_nonzero(grad) == 0, name
        else:  # the plain block's gradient, the same operations in the same order
            assert torch.equal(grad, grads_plain[name]), name
    assert torch.count_nonzero(m.grad) == 0
    # the number 0: skipped, the same result, no gradient at all for the cross-attention
    out_f = blk(x, 8, 8, m, 0.0)
    assert torch.equal(out_f, expected)
    grads_f = _grads(blk, out_f, g)
    for name, grad in grads_f.items():
        if name.startswith(("cross_attn.", "norm_cross.")):
            assert grad is None, name
        else:
            assert torch.equal(grad, grads_t[name]), name
    # motion may be left out with the number 0
    assert torch.equal(blk(x, 8, 8, None, 0), expected)
    # an all-zero 0-dim tensor too
    assert torch.equal(blk(x, 8, 8, m, torch.tensor(0.0)), expected)


def test_per_sample_scale_mixes():
    torch.manual_seed(0)
    blk = randomize(hnn.TransformerBlock(DIM, HEADS, context_dim=CTX), std=0.1)
    x, m = inputs(b=4)
    scale = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=torch.float64)  # any real dtype
    out = blk(x, 8, 8, m, scale)
    for i, s in enumerate(scale.tolist()):
        single = blk(x[i:i + 1], 8, 8, m[i:i + 1], s)
        torch.testing.assert_close(out[i:i + 1], single, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1:2], _plain_copy(blk)(x[1:2], 8, 8), rtol=1e-6, atol=1e-6)
    assert rel_err(out, r_block(blk, x, 8, 8, m, scale)) < TOL
    # a 0-dim tensor is one scale for the batch
    torch.testing.assert_close(blk(x, 8, 8, m, torch.tensor(0.5)), blk(x, 8, 8, m, 0.5), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------

#: Relative-norm bound of float32 gradients against the float64 reference (as the input
#: gradients' in test_input_gradients_match_reference).
GRAD_TOL = 1e-4


def _check_all_grads(module, forward, reference):
    """Every parameter's gradient of ``sum(out ** 2)`` against the float64 reference's
    (``reference(copy)`` on a float64 copy of ``module``, whose parameters it reads
    through :func:`P`); none may be missing."""
    module.zero_grad(set_to_none=True)
    forward(module).pow(2).sum().backward()
    copy64 = copy.deepcopy(module).double()
    copy64.zero_grad(set_to_none=True)
    reference(copy64).pow(2).sum().backward()
    want = dict(copy64.named_parameters())
    for name, p in module.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert want[name].grad is not None, f"the reference gives no gradient for {name}"
        assert rel_err(p.grad, want[name].grad) < GRAD_TOL, (name, rel_err(p.grad, want[name].grad))


@pytest.mark.parametrize("context,sr", [(True, 1), (False, 2)])
def test_gradients_reach_every_parameter(context, sr):
    torch.manual_seed(0)
    blk = hnn.TransformerBlock(DIM, HEADS, context_dim=CTX if context else None, sr_ratio=sr)
    if context:  # with the zero projection, q and kv get zero gradients, as they should
        with torch.no_grad():
            blk.cross_attn.proj.weight.normal_(0, 0.05)
    x, m = inputs()
    motion = m if context else None
    _check_all_grads(blk, lambda mod: mod(x, 8, 8, motion),
                     lambda mod: r_block(mod, P(x), 8, 8, None if motion is None else P(motion)))


def test_gradients_reach_embeddings():
    torch.manual_seed(0)
    embed = hnn.PatchEmbed(3, DIM)
    img = torch.randn(2, 3, 16, 16)
    weights = torch.randn(2, 64, DIM)
    _check_all_grads(embed, lambda mod: mod(img)[0] * weights, lambda mod: r_patch_embed(mod, P(img))[0] * P(weights))
    motion = hnn.MotionTokens(in_dim=20, hidden=16, num_tokens=LM, token_dim=CTX)
    m = torch.randn(2, 20)
    _check_all_grads(motion, lambda mod: mod(m), lambda mod: r_motion_tokens(mod, P(m)))


def test_input_gradients_match_reference():
    torch.manual_seed(0)
    blk = randomize(hnn.TransformerBlock(DIM, HEADS, context_dim=CTX), std=0.1)
    x, m = inputs()
    g = torch.randn(2, 64, DIM)
    xs, ms = x.clone().requires_grad_(True), m.clone().requires_grad_(True)
    (blk(xs, 8, 8, ms, 0.7) * g).sum().backward()
    xr, mr = P(x).requires_grad_(True), P(m).requires_grad_(True)
    (r_block(blk, xr, 8, 8, mr, 0.7) * P(g)).sum().backward()
    assert rel_err(xs.grad, xr.grad) < 1e-4
    assert rel_err(ms.grad, mr.grad) < 1e-4


# ----------------------------------------------------------------------------------
# dtypes, backends, NVTX
# ----------------------------------------------------------------------------------

def test_bfloat16_and_autocast():
    torch.manual_seed(0)
    blk = randomize(hnn.TransformerBlock(DIM, HEADS, context_dim=CTX, sr_ratio=2), std=0.1)
    x, m = inputs()
    ref = r_block(blk, x, 8, 8, m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = blk(x, 8, 8, m, torch.ones(2))
    assert out.dtype == torch.float32 and rel_err(out, ref) < 0.05
    low = blk.to(torch.bfloat16)
    out = low(x.bfloat16(), 8, 8, m.bfloat16())
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 0.05


def test_backend_is_passed_through(monkeypatch):
    seen = []
    real = head4d.ops.attention

    def spy(q, k, v, *, scale=None, backend=None):
        seen.append(backend)
        return real(q, k, v, scale=scale, backend="torch")

    monkeypatch.setattr(head4d.ops, "attention", spy)
    x, m = inputs()
    blk = hnn.TransformerBlock(DIM, HEADS, context_dim=CTX, backend="sdpa")
    assert blk.attn.backend == blk.cross_attn.backend == "sdpa"
    blk(x, 8, 8, m)
    assert seen == ["sdpa", "sdpa"]
    assert hnn.set_attention_backend(blk, "triton") == 2
    blk(x, 8, 8, m)
    assert seen[2:] == ["triton", "triton"]
    hnn.Attention(DIM, HEADS, backend="torch")(x, 8, 8)
    hnn.CrossAttention(DIM, CTX, HEADS)(x, m)
    assert seen[4:] == ["torch", None]


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_cpu_backends_agree(backend):
    torch.manual_seed(0)
    blk = randomize(hnn.TransformerBlock(DIM, HEADS, context_dim=CTX, sr_ratio=2, backend=backend), std=0.1)
    x, m = inputs()
    assert rel_err(blk(x, 8, 8, m), r_block(blk, x, 8, 8, m)) < 1e-4


def test_triton_backend_tiny():
    """One tiny block (4 x 4 grid, sr 2 -> 4 keys; 4 motion tokens) through the Triton
    kernels (the interpreter on CPU), forward and gradients against the torch backend."""
    device = require_backend("triton")
    torch.manual_seed(0)
    blk = randomize(hnn.TransformerBlock(DIM, HEADS, context_dim=CTX, sr_ratio=2, backend="torch"), std=0.1)
    blk = blk.to(device)
    x, m = (t.to(device) for t in inputs(b=1, h=4, w=4))
    g = torch.randn(1, 16, DIM, device=device)
    results = {}
    for backend in ("torch", "triton"):
        hnn.set_attention_backend(blk, backend)
        xs = x.clone().requires_grad_(True)
        out = blk(xs, 4, 4, m)
        grads = _grads(blk, out, g)
        results[backend] = (out.detach(), xs.grad, grads)
    (o_ref, gx_ref, gp_ref), (o, gx, gp) = results["torch"], results["triton"]
    tol = 5e-3 if device.type == "cuda" else 1e-4  # TF32 on the GPU
    assert rel_err(o, o_ref) < tol
    assert rel_err(gx, gx_ref) < tol
    for name in gp_ref:
        assert rel_err(gp[name], gp_ref[name]) < tol, name


def test_nvtx_ranges(monkeypatch):
    names = []
    real = _nvtx.nvtx_range

    def record(name):
        names.append(name)
        return real(name)

    monkeypatch.setattr(_nvtx, "nvtx_range", record)
    x, m = inputs()
    hnn.TransformerBlock(DIM, HEADS, context_dim=CTX)(x, 8, 8, m)
    hnn.PatchEmbed(3, DIM)(torch.randn(1, 3, 8, 8))
    hnn.MotionTokens(8, 8, 2, 16)(torch.randn(1, 8))
    assert names == ["head4d.nn.TransformerBlock", "head4d.nn.CrossAttention", "head4d.nn.Attention",
                     "head4d.nn.MixFFN", "head4d.nn.PatchEmbed", "head4d.nn.MotionTokens"]


# ----------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------

def test_bad_construction():
    with pytest.raises(ValueError, match=r"head dim 24 .*supported head dims: \(32, 64, 128, 256, 512\)"):
        hnn.Attention(48, 2)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        hnn.CrossAttention(64, 16, 3)
    with pytest.raises(ValueError, match="head4d.nn.TransformerBlock: head dim 16"):
        hnn.TransformerBlock(64, 4)
    with pytest.raises(ValueError, match="sr_ratio must be >= 1"):
        hnn.Attention(64, 2, sr_ratio=0)
    with pytest.raises(TypeError, match="context_dim must be an int"):
        hnn.TransformerBlock(64, 2, context_dim=4.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        hnn.Attention(64, 2, backend="cuda")
    with pytest.raises(ValueError, match="mlp_ratio must be finite and positive"):
        hnn.TransformerBlock(64, 2, mlp_ratio=0)
    blk = hnn.TransformerBlock(64, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        hnn.set_attention_backend(blk, "flash")


def test_bad_inputs():
    x, m = inputs()
    blk = hnn.TransformerBlock(DIM, HEADS, context_dim=CTX)
    attn = hnn.Attention(DIM, HEADS, sr_ratio=2)
    with pytest.raises(ValueError, match=r"x has 64 tokens .* grid \(h, w\) = \(8, 7\) holds h \* w = 56"):
        blk(x, 8, 7, m)
    with pytest.raises(ValueError, match=r"x has 64 tokens"):
        attn(x, 4, 4)
    with pytest.raises(ValueError, match=r"context must have context_dim = 48 channels .* got shape \[2, 4, 32\]"):
        blk(x, 8, 8, m[..., :32])
    with pytest.raises(ValueError, match="context has batch 1"):
        blk(x, 8, 8, m[:1])
    with pytest.raises(ValueError, match="motion .* is required unless scale is the number 0"):
        blk(x, 8, 8)
    with pytest.raises(ValueError, match="no cross-attention"):
        hnn.TransformerBlock(DIM, HEADS)(x, 8, 8, m)
    with pytest.raises(ValueError, match="leave it at its default"):
        hnn.TransformerBlock(DIM, HEADS)(x, 8, 8, None, 0.0)
    with pytest.raises(ValueError, match=r"scale must be a number or a tensor of shape \[B\] = \[2\]"):
        blk(x, 8, 8, m, torch.ones(3))
    with pytest.raises(TypeError, match="scale must be a real number"):
        blk(x, 8, 8, m, "1")
    with pytest.raises(ValueError, match="scale must be finite"):
        blk(x, 8, 8, m, float("nan"))
    with pytest.raises(ValueError, match=r"must have 64 channels in its last dimension"):
        blk(x[..., :32], 8, 8, m)
    with pytest.raises(ValueError, match=r"shape \[B, h\*w, 64\]"):
        blk(x[0], 8, 8, m)
    with pytest.raises(TypeError, match=r"head4d.nn.Attention: x must have a dtype in \(float16, bfloat16, float32\)"):
        attn(x.double(), 8, 8)
    with pytest.raises(TypeError, match="h must be an int"):
        attn(x, 8.0, 8)
    with pytest.raises(ValueError, match="smaller than sr_ratio"):
        attn(x, 64, 1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        hnn.MixFFN(DIM, 8)(x.numpy(), 8, 8)
    with pytest.raises(ValueError, match=r"head4d.nn.PatchEmbed: x must have in_ch = 3 channels"):
        hnn.PatchEmbed(3, DIM)(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"head4d.nn.MotionTokens: motion must have in_dim = 548 values"):
        with torch.device("meta"):
            hnn.MotionTokens()(torch.empty(2, 109))


# ----------------------------------------------------------------------------------
# upstream names
# ----------------------------------------------------------------------------------

def _to_upstream(state, cross):
    """head4d names -> the released names (the inverse of head4d.nn.upstream's table)."""
    rules = ([("norm_cross.", "norm2."), ("cross_attn.", "attn2."), ("norm_attn.", "norm1."), ("attn.", "attn1."),
              ("norm_mlp.", "norm3."), ("mlp.", "mlp.")] if cross else
             [("norm_attn.", "norm1."), ("attn.", "attn."), ("norm_mlp.", "norm2."), ("mlp.", "mlp.")])
    out = {}
    for k, v in state.items():
        for new, old in rules:
            if k.startswith(new):
                out[old + k[len(new):]] = v
                break
    assert len(out) == len(state)
    return out


@pytest.mark.parametrize("cross", [True, False])
def test_upstream_block_names(cross):
    torch.manual_seed(0)
    src = randomize(hnn.TransformerBlock(DIM, HEADS, context_dim=CTX if cross else None,
                                         sr_ratio=1 if cross else 2))
    prefix = "trans_blocks_motion.1." if cross else "trans_blocks.0."
    upstream = {prefix + k: v for k, v in _to_upstream(src.state_dict(), cross).items()}
    assert prefix + "mlp.dwconv.dwconv.weight" in upstream  # the Mix-FFN keeps the released names
    upstream["unrelated.weight"] = torch.zeros(1)
    dst = hnn.TransformerBlock(DIM, HEADS, context_dim=CTX if cross else None, sr_ratio=1 if cross else 2)
    dst.load_state_dict(hnn.upstream.map_upstream_block(upstream, prefix))
    x, m = inputs()
    assert torch.equal(dst(x, 8, 8, m if cross else None), src(x, 8, 8, m if cross else None))
    with pytest.raises(KeyError, match="no upstream parameters"):
        hnn.upstream.map_upstream_block(upstream, "nothing.")


def test_upstream_motion_and_patch_embed_names():
    torch.manual_seed(0)
    src = randomize(hnn.MotionTokens(20, 16, LM, CTX))
    sd = src.state_dict()
    upstream = {"maps_neutral.0.weight": sd["mlp.0.weight"], "maps_neutral.0.bias": sd["mlp.0.bias"],
                "maps_neutral.2.weight": sd["mlp.2.weight"], "maps_neutral.2.bias": sd["mlp.2.bias"],
                "proj_y_neutral.weight": sd["proj.weight"], "proj_y_neutral.bias": sd["proj.bias"],
                "maps.0.weight": torch.zeros(16, 20)}
    dst = hnn.MotionTokens(20, 16, LM, CTX)
    dst.load_state_dict(hnn.upstream.map_upstream_motion_mlp(upstream, "source"))
    m = torch.randn(2, 20)
    assert torch.equal(dst(m), src(m))
    with pytest.raises(KeyError, match="proj_y.weight"):
        hnn.upstream.map_upstream_motion_mlp(upstream, "driver")
    embed = hnn.PatchEmbed(3, DIM)
    embed.load_state_dict(hnn.upstream.map_upstream_prefix(
        {"patch_embed." + k: v for k, v in hnn.PatchEmbed(3, DIM).state_dict().items()}, "patch_embed."))
