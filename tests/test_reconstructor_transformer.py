"""The reconstructor's transformer with the released names (``head4d.nn.BlockCross``,
``Block``, ``EncoderCanonical``, ``DecoderTriplane``): each against an independent
composition of ``torch.nn.functional`` calls written here (F.linear, F.layer_norm, an
explicit softmax attention, F.conv2d, F.pixel_shuffle, F.interpolate) in float64 with the
module's randomly drawn weights (biases and norms non-trivial), forward and every
parameter's gradient; the full-size modules' names, shapes and counts against the upstream
list (``tests/data/reconstructor_state_dict.txt``) and a strict load of an upstream-named
state dict; motion scale 0; canonicalize + reenact == forward; bad input.

Sizes are small (dim 64, 2 heads of 32, 4 x 4 or 8 x 8 token grids, 4 motion tokens); the
full-size modules are built on the meta device, except the decoder's real state-dict load.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import head4d
import head4d.nn as hnn
from head4d import _nvtx

from genhead_testing import RECONSTRUCTOR_DATA, upstream_sections

DIM, HEADS = 64, 2
SMALL_ENCODER = dict(in_chans=16, embed_dims=DIM, mot_dims=12, mot_dims_hidden=16, H_y=2, W_y=2, num_heads=HEADS,
                     mlp_ratios=2, num_blocks_neutral=2, num_blocks_motion=2, mapping_layers=2)
SMALL_DECODER = dict(embed_dims=DIM, num_heads=HEADS, mlp_ratios=2, num_blocks=1, sr_ratios=2)

#: The modules run in float32 (head4d.ops.attention takes no float64) against the float64
#: reference. Float32 rounds each operation to u = 2^-24 relative; BLAS and the convs sum
#: in blocks, so a dot product of up to 1,152 terms (128 channels x 3 x 3) errs by a few u
#: on these unit-scale activations (the random weights keep LayerNorm, softmax and the
#: convs well conditioned, factors O(1)). The longest path chains about 25 such layers
#: (2 + 2 blocks of 6 matmuls, the patch embedding, the motion MLP, the convs) whose
#: independent roundings add in quadrature, sqrt(25) = 5: some 20 u, bounded at 100 u in
#: the relative Frobenius norm (measured: 7 to 10 u). The backward pass runs the chain
#: twice more and multiplies rounded factors: 300 u (measured: at most 23 u).
U32 = 2.0 ** -24
TOL = 100 * U32
GRAD_TOL = 300 * U32


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def randomize(module, seed=0):
    """Weights of unit-scale activations (Linear ``N(0, 1 / fan_in)``, so the attention
    logits are O(1); convs keep their He init), biases ``N(0, 0.1^2)``, LayerNorm gains
    ``1 + N(0, 0.1^2)`` and offsets ``N(0, 0.1^2)``: every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) / math.sqrt(mod.in_features))
            elif isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1.0 + 0.1 * torch.randn(mod.weight.shape, generator=gen))
            if isinstance(mod, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Conv2d)) and mod.bias is not None:
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))
    return module


# ----------------------------------------------------------------------------------
# the independent reference: torch.nn.functional, float64
# ----------------------------------------------------------------------------------

def P(t):
    """A parameter in float64: a float64 copy's parameter passes through (gradients reach
    it), a float32 one becomes a constant."""
    return t if t.dtype == torch.float64 else t.detach().double()


def f_linear(x, lin):
    return F.linear(x, P(lin.weight), None if lin.bias is None else P(lin.bias))


def f_layer_norm(x, ln):
    return F.layer_norm(x, (x.shape[-1],), P(ln.weight), P(ln.bias), ln.eps)


def f_conv(x, conv, **kw):
    return F.conv2d(x, P(conv.weight), P(conv.bias), **kw)


def f_to_map(tokens, h, w):
    """``[B, h*w, C]`` row-major tokens -> ``[B, C, h, w]``."""
    b, n, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def f_to_tokens(m):
    return m.flatten(2).transpose(1, 2)


def f_softmax_attention(q, k, v, heads):
    """``[B, L, H*D]`` queries over ``[B, Lk, H*D]`` keys/values: the explicit
    ``softmax(q k^T / sqrt(D)) v`` per head, max-subtracted."""
    b, lq, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(b, t.shape[1], heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    out = (e / e.sum(-1, keepdim=True)) @ v
    return out.permute(0, 2, 1, 3).reshape(b, lq, c)


def f_attention(attn, xq, xkv, heads):
    """q from ``xq``; ``kv`` from ``xkv``: the first ``dim`` outputs keys, the rest values."""
    c = xq.shape[-1]
    kv = f_linear(xkv, attn.kv)
    return f_linear(f_softmax_attention(f_linear(xq, attn.q), kv[..., :c], kv[..., c:], heads), attn.proj)


def f_self_attention(attn, x, h, w, heads, sr=1):
    source = x
    if sr > 1:
        source = f_layer_norm(f_to_tokens(f_conv(f_to_map(x, h, w), attn.sr, stride=sr)), attn.norm)
    return f_attention(attn, x, source, heads)


def f_mix_ffn(mlp, x, h, w):
    hidden = f_linear(x, mlp.fc1)
    conv = mlp.dwconv.dwconv  # the released name mlp.dwconv.dwconv
    hidden = f_to_tokens(f_conv(f_to_map(hidden, h, w), conv, padding=1, groups=hidden.shape[-1]))
    return f_linear(F.gelu(hidden), mlp.fc2)


def f_scale(scale):
    return scale.double().reshape(-1, 1, 1) if isinstance(scale, torch.Tensor) else scale


def f_block_cross(blk, x, y, h, w, scale=1.0):
    """The released order: cross-attention (norm2, attn2), self-attention (norm1, attn1),
    Mix-FFN (norm3, mlp)."""
    x = x + f_scale(scale) * f_attention(blk.attn2, f_layer_norm(x, blk.norm2), y, HEADS)
    x = x + f_self_attention(blk.attn1, f_layer_norm(x, blk.norm1), h, w, HEADS)
    return x + f_mix_ffn(blk.mlp, f_layer_norm(x, blk.norm3), h, w)


def f_block(blk, x, h, w, sr, scale=1.0):
    x = x + f_scale(scale) * f_self_attention(blk.attn, f_layer_norm(x, blk.norm1), h, w, HEADS, sr)
    return x + f_mix_ffn(blk.mlp, f_layer_norm(x, blk.norm2), h, w)


def f_patch_embed(pe, x):
    m = f_conv(x, pe.proj, stride=2, padding=1)
    return f_layer_norm(f_to_tokens(m), pe.norm), m.shape[2], m.shape[3]


def f_motion_tokens(maps, proj, motion, tokens):
    for i in range(0, len(maps or ()), 2):  # [Linear, LeakyReLU] pairs; none without mapping layers
        motion = F.leaky_relu(f_linear(motion, maps[i]), 0.01)
    out = f_linear(motion, proj)
    return out.reshape(out.shape[0], tokens, -1)  # token-major


def f_up2(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def f_encoder_canonical(enc, x, y, y_x, scale=1.0):
    """``[lr, sr]``; y the driving motion (maps, proj_y: the motion blocks), y_x the
    source's (maps_neutral, proj_y_neutral: the neutral blocks)."""
    t = enc.H_y * enc.W_y
    m_drv = f_motion_tokens(enc.maps, enc.proj_y, P(y), t)
    m_src = f_motion_tokens(enc.maps_neutral, enc.proj_y_neutral, P(y_x), t)
    tokens, h, w = f_patch_embed(enc.patch_embed, P(x))
    for blk in enc.trans_blocks_neutral:
        tokens = f_block_cross(blk, tokens, m_src, h, w, scale)
    for blk in enc.trans_blocks_motion:
        tokens = f_block_cross(blk, tokens, m_drv, h, w, scale)
    lr = F.pixel_shuffle(f_to_map(tokens, h, w), 2)
    c = enc.convs
    sr = F.relu(f_conv(f_up2(lr), c[1], padding=1))
    sr = F.relu(f_conv(f_up2(sr), c[4], padding=1))
    return [lr, f_conv(sr, c[6], padding=1)]


def f_decoder_triplane(dec, x_global, x_detail, sr):
    x = torch.cat([P(x_global), P(x_detail)], 1)
    x = F.leaky_relu(f_conv(x, dec.convs1[0], padding=1), 0.01)
    x = F.leaky_relu(f_conv(x, dec.convs1[2], padding=1), 0.01)
    tokens, h, w = f_patch_embed(dec.patch_embed, x)
    for blk in dec.trans_blocks:
        tokens = f_block(blk, tokens, h, w, sr)
    x = torch.cat([F.pixel_shuffle(f_to_map(tokens, h, w), 2), P(x_global)], 1)
    for i in (0, 2, 4):
        x = F.leaky_relu(f_conv(x, dec.convs2[i], padding=1), 0.01)
    return f_conv(x, dec.conv_last, padding=1)


# ----------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------

def draw(*shapes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


def check_against_reference(module, run, reference, outputs_of=lambda out: out):
    """``run(module)`` in float32 against ``reference(copy)`` on a float64 copy: every
    output within TOL, and the gradient of ``sum(out * g)`` for every parameter (present,
    non-zero) within GRAD_TOL."""
    out = outputs_of(run(module))
    copy64 = copy.deepcopy(module).double()  # parameter holder for the reference
    ref = outputs_of(reference(copy64))
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(o.shape, generator=gen) for o in out]
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == torch.float32
        assert rel_err(o, r) < TOL
    module.zero_grad(set_to_none=True)
    sum((o * g).sum() for o, g in zip(out, weights)).backward()
    sum((r * g.double()).sum() for r, g in zip(ref, weights)).backward()
    params64 = dict(copy64.named_parameters())
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, f"no gradient reaches {name}"
        assert rel_err(p.grad, params64[name].grad) < GRAD_TOL, name


def small_encoder(seed=0, **kw):
    torch.manual_seed(seed)
    return randomize(hnn.EncoderCanonical(**{**SMALL_ENCODER, **kw}), seed)


def encoder_inputs(b=2, seed=1):
    return draw((b, 16, 8, 8), (b, 12), (b, 12), seed=seed)


def small_decoder(seed=0):
    torch.manual_seed(seed)
    return randomize(hnn.DecoderTriplane(**SMALL_DECODER), seed)


# ----------------------------------------------------------------------------------
# the blocks
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 0.5, "per-sample"])
def test_block_cross_matches_reference(scale):
    torch.manual_seed(0)
    blk = randomize(hnn.BlockCross(DIM, HEADS, mlp_ratio=2, qkv_bias=True, context_dim=48))
    x, y = draw((3, 16, DIM), (3, 4, 48))
    if scale == "per-sample":
        scale = torch.tensor([1.0, 0.0, 0.3])
    check_against_reference(blk, lambda m: [m(x, y, 4, 4, scale=scale)],
                            lambda m: [f_block_cross(m, P(x), P(y), 4, 4, scale)])


@pytest.mark.parametrize("sr,scale", [(1, 1.0), (2, 1.0), (2, "per-sample")])
def test_block_matches_reference(sr, scale):
    torch.manual_seed(0)
    blk = randomize(hnn.Block(DIM, HEADS, mlp_ratio=1.5, qkv_bias=True, sr_ratio=sr))
    assert blk.mlp.hidden == 96 and (blk.attn.sr is None) == (sr == 1)
    (x,) = draw((2, 64, DIM))
    if scale == "per-sample":  # the released Block scales its self-attention branch
        scale = torch.tensor([0.7, 1.0])
    check_against_reference(blk, lambda m: [m(x, 8, 8, scale)], lambda m: [f_block(m, P(x), 8, 8, sr, scale)])


def test_released_block_defaults_and_names():
    """The released constructors' defaults (mlp_ratio 4, no qkv bias) and module names."""
    cross, plain = hnn.BlockCross(DIM, HEADS), hnn.Block(DIM, HEADS, sr_ratio=2)
    assert cross.mlp.hidden == 4 * DIM and cross.attn1.q.bias is None and cross.attn2.kv.bias is None
    assert cross.attn2.kv.in_features == DIM  # the motion tokens have the tokens' width by default
    assert [n for n, _ in cross.named_children()] == ["norm1", "attn1", "norm2", "attn2", "norm3", "mlp"]
    assert [n for n, _ in plain.named_children()] == ["norm1", "attn", "norm2", "mlp"]
    assert "mlp.dwconv.dwconv.weight" in cross.state_dict() and "attn.sr.weight" in plain.state_dict()


def test_block_cross_equals_transformer_block():
    """The released spelling and head4d's compute the same function (shared scale handling)."""
    torch.manual_seed(0)
    cross = randomize(hnn.BlockCross(DIM, HEADS, mlp_ratio=2, qkv_bias=True))
    ours = hnn.TransformerBlock(DIM, HEADS, context_dim=DIM)
    ours.load_state_dict(hnn.upstream.map_upstream_block(cross.state_dict(), cross=True))
    x, y = draw((2, 16, DIM), (2, 4, DIM))
    for scale in (1.0, 0.0, torch.tensor([0.0, 0.5])):
        assert torch.equal(cross(x, y, 4, 4, scale=scale), ours(x, 4, 4, y, scale))


def test_block_cross_scale_zero():
    """The number 0 skips the cross-attention (no gradient, y may be None); a zero tensor
    gives the same tokens bit for bit with exactly zero cross-attention gradients."""
    torch.manual_seed(0)
    blk = randomize(hnn.BlockCross(DIM, HEADS, qkv_bias=True))
    x, y = draw((2, 16, DIM), (2, 4, DIM))
    skipped = blk(x, None, 4, 4, scale=0)
    zeroed = blk(x, y, 4, 4, scale=torch.zeros(2))
    assert torch.equal(skipped, zeroed)
    zeroed.sum().backward()
    for name, p in blk.named_parameters():
        if name.startswith(("attn2.", "norm2.")):
            assert torch.count_nonzero(p.grad) == 0, name
        else:
            assert torch.count_nonzero(p.grad) > 0, name
    blk.zero_grad(set_to_none=True)
    blk(x, y, 4, 4, scale=0.0).sum().backward()
    assert blk.attn2.q.weight.grad is None and blk.norm1.weight.grad is not None


def test_released_initialization():
    """The released final state: the cross-attention's output projection random like every
    Linear (not the paper's zero), biases zero, norms ones/zeros; conv_last N(0, 0.15)."""
    torch.manual_seed(0)
    enc = hnn.EncoderCanonical(**SMALL_ENCODER)
    proj = enc.trans_blocks_motion[0].attn2.proj
    assert torch.count_nonzero(proj.weight) == proj.weight.numel()
    # N(0, 0.02^2) cut at +-2 in value (the released bounds), so practically untruncated:
    # std 0.02 within 5 % over 4,096 draws (1.1 % standard error), and values beyond 2 std occur (~4.6 %)
    assert abs(proj.weight.std().item() / 0.02 - 1) < 0.05
    assert (proj.weight.abs() > 0.04).float().mean().item() > 0.02
    for name, p in enc.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        if "norm" in name and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    conv = enc.convs[1]  # He normal over the fan-out: std sqrt(2 / (9 * 128))
    assert abs(conv.weight.std().item() / math.sqrt(2 / (9 * 128)) - 1) < 0.05
    dec = hnn.DecoderTriplane(**SMALL_DECODER)
    assert abs(dec.conv_last.weight.std().item() / 0.15 - 1) < 0.02  # 110,592 draws
    assert torch.count_nonzero(dec.conv_last.bias) == 0


# ----------------------------------------------------------------------------------
# EncoderCanonical
# ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, "per-sample"])
def test_encoder_canonical_matches_reference(scale):
    enc = small_encoder()
    x, y, y_x = encoder_inputs()
    if scale == "per-sample":
        scale = torch.tensor([0.4, 1.0])
    check_against_reference(enc, lambda m: m(x, y, y_x, scale=scale),
                            lambda m: f_encoder_canonical(m, x, y, y_x, scale))
    lr, sr = enc(x, y, y_x, scale)
    assert lr.shape == (2, 16, 8, 8) and sr.shape == (2, 96, 32, 32)


def test_encoder_canonical_without_mapping_layers():
    enc = small_encoder(mapping_layers=0, num_blocks_neutral=1, num_blocks_motion=1)
    assert enc.maps is None and enc.maps_neutral is None and enc.proj_y.in_features == 12
    x, y, y_x = encoder_inputs()
    out = enc(x, y, y_x)
    ref = f_encoder_canonical(enc, x, y, y_x)
    assert all(rel_err(o, r) < TOL for o, r in zip(out, ref))


def test_encoder_canonical_motion_roles():
    """y (driving) feeds only the re-enactment blocks, y_x (source) only the
    canonicalization blocks."""
    enc = small_encoder()
    x, y, y_x = encoder_inputs()
    tokens, grid = enc.canonicalize(x, y_x)
    assert torch.equal(enc.canonicalize(x, y_x)[0], tokens)
    other = torch.randn_like(y)
    assert rel_err(enc.canonicalize(x, other)[0], tokens) > 1e-2  # the source's motion matters
    assert rel_err(enc(x, other, y_x)[1], enc(x, y, y_x)[1]) > 1e-2  # and the driver's


def test_canonicalize_then_reenact_equals_forward():
    enc = small_encoder()
    x, y, y_x = encoder_inputs(b=3)
    scale = torch.tensor([1.0, 0.0, 0.5])
    tokens, (h, w) = enc.canonicalize(x, y_x, scale)
    assert tokens.shape == (3, 16, DIM) and (h, w) == (4, 4) and all(type(v) is int for v in (h, w))
    split = enc.reenact(tokens, h, w, y, scale)
    whole = enc(x, y, y_x, scale)
    assert isinstance(whole, list) and len(whole) == 2
    assert all(torch.equal(a, b) for a, b in zip(split, whole))
    # one source, several driving motions: the canonical tokens repeated along the batch
    one, grid = enc.canonicalize(x[:1], y_x[:1])
    frames = enc.reenact(one.expand(3, -1, -1), *grid, y)
    for i in range(3):
        ref = enc(x[:1], y[i:i + 1], y_x[:1])  # batch 1: other float32 rounding than batch 3
        assert all(rel_err(f[i:i + 1], r) < TOL for f, r in zip(frames, ref))


@pytest.mark.parametrize("scale", [0, 0.0, "zeros"])
def test_encoder_scale_zero_ignores_motion(scale):
    enc = small_encoder()
    x, y, y_x = encoder_inputs()
    if scale == "zeros":
        scale = torch.zeros(2)
    a = enc(x, y, y_x, scale)
    b = enc(x, torch.randn_like(y) * 3, torch.randn_like(y_x) * 3, scale)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    # and the motion does matter at scale 1
    assert rel_err(enc(x, y, y_x)[1], a[1]) > 1e-2
    # per sample: only the sample at 0 ignores the motion
    mixed = torch.tensor([0.0, 1.0])
    c, d = enc(x, y, y_x, mixed), enc(x, -y, -y_x, mixed)
    assert torch.equal(c[1][0], d[1][0]) and not torch.allclose(c[1][1], d[1][1])
    assert torch.equal(c[1][0], a[1][0])


def test_encoder_attention_runs_on_head4d_ops(monkeypatch):
    calls = []
    real = head4d.ops.attention

    def spy(q, k, v, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), kw.get("backend")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(head4d.ops, "attention", spy)
    enc = small_encoder()
    enc.trans_blocks_neutral[0].attn1.backend = "sdpa"
    enc(*encoder_inputs(b=1))
    # per block: cross-attention to the 4 motion tokens, then self-attention over 16 tokens
    assert [c[:2] for c in calls] == [((1, 2, 16, 32), (1, 2, 4, 32)), ((1, 2, 16, 32), (1, 2, 16, 32))] * 4
    assert [c[2] for c in calls] == [None, "sdpa"] + [None] * 6
    calls.clear()
    small_decoder()(*draw((1, 96, 16, 16), (1, 96, 16, 16)))
    assert calls == [((1, 2, 64, 32), (1, 2, 16, 32), None)]  # 8 x 8 tokens over 4 x 4 reduced keys
    assert hnn.set_attention_backend(enc, "torch") == 8


# ----------------------------------------------------------------------------------
# DecoderTriplane
# ----------------------------------------------------------------------------------

def test_decoder_triplane_matches_reference():
    dec = small_decoder()
    x_global, x_detail = draw((2, 96, 16, 16), (2, 96, 16, 16))
    check_against_reference(dec, lambda m: [m(x_global, x_detail)],
                            lambda m: [f_decoder_triplane(m, x_global, x_detail, 2)])
    assert dec(x_global, x_detail).shape == (2, 96, 16, 16)


def test_bfloat16_autocast():
    """Under bfloat16 autocast both modules run and stay within bfloat16 rounding of the
    float32 result: u = 2^-8 per cast operand, independent over the ~25 chained layers
    (quadrature: 5 u), bounded at 8 u (measured: about 2.5 u)."""
    enc, dec = small_encoder(), small_decoder()
    x, y, y_x = encoder_inputs()
    full = enc(x, y, y_x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = enc(x, y, y_x)
        planes = dec(low[1], low[1])
    assert all(o.dtype == torch.bfloat16 and rel_err(o, f) < 8 * 2.0 ** -8 for o, f in zip(low, full))
    assert planes.dtype == torch.bfloat16 and rel_err(planes, dec(full[1], full[1])) < 8 * 2.0 ** -8


# ----------------------------------------------------------------------------------
# full size: the upstream names, shapes and counts; loading a released state dict
# ----------------------------------------------------------------------------------

def full_size(name):
    with torch.device("meta"):  # shapes only, no 690 MB of weights
        return hnn.EncoderCanonical() if name == "encoder_canonical" else hnn.DecoderTriplane()


@pytest.mark.parametrize("name", ["encoder_canonical", "generator_triplane"])
def test_full_size_matches_upstream_list(name):
    keys, params, entries = upstream_sections(strip_prefix=True, path=RECONSTRUCTOR_DATA)[name]
    module = full_size(name)
    state = module.state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == [(n, s) for n, s, _ in entries]  # order too
    assert len(state) == keys and sum(p.numel() for p in module.parameters()) == params
    assert all(dtype == "float32" for _, _, dtype in entries) and not list(module.buffers())


def test_full_size_configuration():
    enc, dec = full_size("encoder_canonical"), full_size("generator_triplane")
    blk = enc.trans_blocks_motion[3]
    assert blk.attn1.head_dim == 256 and blk.attn2.kv.in_features == 1024 and blk.mlp.hidden == 2048
    assert enc.num_motion_tokens == 64 and len(enc.trans_blocks_neutral) == len(enc.trans_blocks_motion) == 4
    assert dec.trans_blocks[0].attn.head_dim == 512 and dec.trans_blocks[0].attn.sr_ratio == 2
    assert isinstance(enc.convs[0], torch.nn.Upsample) and enc.convs[0].align_corners
    assert [type(m).__name__ for m in enc.convs] == ["Upsample", "Conv2d", "ReLU", "Upsample", "Conv2d", "ReLU",
                                                     "Conv2d"]
    with torch.device("meta"):
        flame = hnn.EncoderCanonical(mot_dims=hnn.FLAME_MOTION_DIM)
    assert flame.maps[0].in_features == flame.maps_neutral[0].in_features == 109


def _random_upstream_state(name, device=None):
    """A state dict under the released names and shapes (prefix stripped), random values."""
    gen = torch.Generator().manual_seed(3)
    entries = upstream_sections(strip_prefix=True, path=RECONSTRUCTOR_DATA)[name][2]
    return {n: (torch.empty(s, device="meta") if device == "meta" else torch.randn(s, generator=gen))
            for n, s, _ in entries}


def test_decoder_loads_released_state_dict():
    state = _random_upstream_state("generator_triplane")
    dec = hnn.DecoderTriplane()
    assert not dec.load_state_dict(state, strict=True).missing_keys
    assert all(torch.equal(v, state[k]) for k, v in dec.state_dict().items())


def test_encoder_loads_released_state_dict():
    """Strict load of every released name and shape (on the meta device: 172M parameters)."""
    enc = full_size("encoder_canonical")
    result = enc.load_state_dict(_random_upstream_state("encoder_canonical", "meta"), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    state = _random_upstream_state("encoder_canonical", "meta")
    state["trans_blocks_motion.0.mlp.dwconv.weight"] = state.pop("trans_blocks_motion.0.mlp.dwconv.dwconv.weight")
    with pytest.raises(RuntimeError, match="mlp.dwconv.dwconv.weight"):
        full_size("encoder_canonical").load_state_dict(state, strict=True, assign=True)


# ----------------------------------------------------------------------------------
# NVTX, errors
# ----------------------------------------------------------------------------------

def test_nvtx_ranges(monkeypatch):
    names = []
    real = _nvtx.nvtx_range
    monkeypatch.setattr(_nvtx, "nvtx_range", lambda name: (names.append(name), real(name))[1])
    small_encoder(num_blocks_neutral=1, num_blocks_motion=0)(*encoder_inputs(b=1))
    assert names[:4] == ["head4d.nn.EncoderCanonical", "head4d.nn.PatchEmbed", "head4d.nn.BlockCross",
                         "head4d.nn.CrossAttention"]
    names.clear()
    small_decoder()(*draw((1, 96, 8, 8), (1, 96, 8, 8)))
    assert names[:3] == ["head4d.nn.DecoderTriplane", "head4d.nn.PatchEmbed", "head4d.nn.Block"]


def test_bad_construction():
    with pytest.raises(ValueError, match=r"EncoderCanonical: embed_dims must be 4 \* in_chans"):
        hnn.EncoderCanonical(in_chans=16, embed_dims=128)
    with pytest.raises(ValueError, match="EncoderCanonical: mot_dims must be >= 1"):
        hnn.EncoderCanonical(**{**SMALL_ENCODER, "mot_dims": 0})
    with pytest.raises(ValueError, match="BlockCross: head dim 24"):
        hnn.EncoderCanonical(**{**SMALL_ENCODER, "embed_dims": 48, "in_chans": 12})
    with pytest.raises(ValueError, match="DecoderTriplane: embed_dims must be a multiple of 4"):
        hnn.DecoderTriplane(embed_dims=66)
    with pytest.raises(ValueError, match="DecoderTriplane: sr_ratios must be >= 1"):
        hnn.DecoderTriplane(**{**SMALL_DECODER, "sr_ratios": 0})
    with pytest.raises(ValueError, match="Block: mlp_ratio must be finite and positive"):
        hnn.Block(DIM, HEADS, mlp_ratio=-1)


def test_bad_inputs():
    enc, dec = small_encoder(), small_decoder()
    x, y, y_x = encoder_inputs()
    with pytest.raises(ValueError, match=r"EncoderCanonical: x must have 16 channels in dimension 1, got shape \[2, 8"):
        enc(x[:, :8], y, y_x)
    with pytest.raises(ValueError, match=r"EncoderCanonical: y must have mot_dims = 12 values per sample"):
        enc(x, y[:, :10], y_x)
    with pytest.raises(ValueError, match=r"EncoderCanonical: y_x has batch 1 .* must match"):
        enc(x, y, y_x[:1])
    with pytest.raises(TypeError, match=r"EncoderCanonical: y_x must be a torch.Tensor"):
        enc(x, y, None)
    with pytest.raises(ValueError, match=r"scale must be a number or a tensor of shape \[B\] = \[2\]"):
        enc(x, y, y_x, torch.ones(3))
    tokens, (h, w) = enc.canonicalize(x, y_x)
    with pytest.raises(ValueError, match=r"EncoderCanonical: tokens has 16 tokens .* \(h, w\) = \(4, 5\)"):
        enc.reenact(tokens, 4, 5, y)
    with pytest.raises(ValueError, match=r"EncoderCanonical: tokens must have 64 channels"):
        enc.reenact(tokens[..., :32], h, w, y)
    with pytest.raises(ValueError, match=r"EncoderCanonical: y has batch 1"):
        enc.reenact(tokens, h, w, y[:1])
    blk = enc.trans_blocks_motion[0]
    with pytest.raises(ValueError, match=r"BlockCross: this block has cross-attention .* y \[B, Lm, 64\] is required"):
        blk(tokens, None, h, w)
    with pytest.raises(ValueError, match=r"CrossAttention: context must have context_dim = 64 channels"):
        blk(tokens, torch.randn(2, 4, 32), h, w)
    with pytest.raises(TypeError, match=r"Block: scale must be a real number"):
        dec.trans_blocks[0](torch.randn(1, 64, DIM), 8, 8, "1")
    g, d = draw((2, 96, 16, 16), (2, 96, 16, 16))
    with pytest.raises(ValueError, match=r"DecoderTriplane: x_detail must have 96 channels in dimension 1"):
        dec(g, d[:, :32])
    with pytest.raises(ValueError, match=r"DecoderTriplane: x_detail must have x_global's shape \[2, 96, 16, 16\]"):
        dec(g, d[:, :, :8])
    with pytest.raises(ValueError, match=r"DecoderTriplane: x_global and x_detail must have an even height"):
        dec(g[..., :15], d[..., :15])
    with pytest.raises(ValueError, match=r"DecoderTriplane: x_global must have shape \[B, 96, H, W\] \(4 dimensions\)"):
        dec(g[0], d[0])
