"""Portrait4D's part masks and correspondence map (head4d/render/masks.py), on a small
hand-made mesh whose answer is known (a plate with a rectangular hole, a quad behind
the hole as the eyeball / inner mouth), against their plain compositions: the
reference rasterizer, coverage products and a 2-D convolution with the outer product
of the blur kernel, computed here."""
import math

import pytest
import torch
import torch.nn.functional as F

from head4d.ops import rasterize_triangles
from head4d.render import correspondence_map, rasterize_masks
from head4d.render.masks import blur_kernel

from conftest import CUDA_EMULATED, require_backend

ALL = ["torch", "cpu", pytest.param("cuda", marks=pytest.mark.gpu), CUDA_EMULATED]
HOLE = (-0.3, 0.3, 0.1, 0.5)  # x0, x1, y0, y1 in NDC
SIZE = 20                      # pixel centres at odd multiples of 0.05: none on the hole's border


def plate_and_quad(quad_front: bool, n: int = 2):
    """Clip-space vertices ``[n, 12, 4]`` (the meshes differ by a shift of a few
    hundredths) and faces: 8 plate faces around the hole (vertices 0..7, z = 0), then
    2 faces of a quad behind the hole (vertices 8..11, z = 0.4), counter-clockwise
    (front) or clockwise."""
    x0, x1, y0, y1 = HOLE
    outer = [(-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)]
    inner = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    quad = [(x0 - 0.1, y0 - 0.1), (x1 + 0.1, y0 - 0.1), (x1 + 0.1, y1 + 0.1), (x0 - 0.1, y1 + 0.1)]
    pts = [(x, y, 0.0) for x, y in outer + inner] + [(x, y, 0.4) for x, y in quad]
    verts = torch.tensor([[x, y, z, 1.0] for x, y, z in pts])
    faces = []
    for k in range(4):
        o, o1, i, i1 = k, (k + 1) % 4, 4 + k, 4 + (k + 1) % 4
        faces += [[o, o1, i1], [o, i1, i]]
    faces += [[8, 9, 10], [8, 10, 11]] if quad_front else [[8, 10, 9], [8, 11, 10]]
    w = 1.0 + 0.1 * torch.arange(n, dtype=torch.float32)  # same NDC, different clip coordinates
    return verts[None] * w[:, None, None], torch.tensor(faces)


def hole_pixels(n):
    j = torch.arange(SIZE)
    x = -1 + (2 * j + 1) / SIZE
    y = 1 - (2 * j + 1) / SIZE
    x0, x1, y0, y1 = HOLE
    inside = ((y[:, None] > y0) & (y[:, None] < y1)) & ((x[None, :] > x0) & (x[None, :] < x1))
    return inside.float().expand(n, 1, SIZE, SIZE)


def plain_blur(mask, sigma):
    radius = math.floor(3 * sigma)
    k = torch.tensor([2.0 ** (-(i / sigma) ** 2) for i in range(-radius, radius + 1)], dtype=torch.float64)
    k2 = torch.outer(k, k) / k.sum() ** 2
    return F.conv2d(mask.double(), k2[None, None], padding=radius).float()


def plain_cover(verts, faces, cull):
    face, _, _ = rasterize_triangles(verts, faces, (SIZE, SIZE), cull_backfaces=cull, backend="torch")
    return (face >= 0).unsqueeze(1).float()


def test_blur_kernel():
    f = blur_kernel(1.0)
    expected = torch.tensor([2.0 ** -(k * k) for k in range(-3, 4)])
    torch.testing.assert_close(f, expected / expected.sum())
    assert blur_kernel(2.0).shape == (13,) and blur_kernel(0.5).shape == (3,)
    with pytest.raises(ValueError, match="sigma must be a finite positive number"):
        blur_kernel(0)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("quad_front", [True, False])
def test_masks_match_their_composition(backend, quad_front):
    device = require_backend(backend)
    verts, faces = plate_and_quad(quad_front)
    quad = torch.arange(8, 12)
    eye, mouth = rasterize_masks(verts.to(device), faces.to(device), (SIZE, SIZE), quad.to(device),
                                 quad.to(device), backend=backend)
    assert eye.shape == mouth.shape == (2, 1, SIZE, SIZE)
    hole = hole_pixels(2)
    # the eyeball render culls: a clockwise quad shows nowhere; the mouth's full-head render does not cull
    expected_eye = plain_blur(hole if quad_front else torch.zeros_like(hole), 1.0)
    expected_mouth = plain_blur(hole, 2.0)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(eye.cpu(), expected_eye, atol=16 * eps, rtol=0)
    torch.testing.assert_close(mouth.cpu(), expected_mouth, atol=16 * eps, rtol=0)
    # and the same as the composition written out with the reference rasterizer
    plate = faces[:8]
    composed_eye = plain_cover(verts, faces[8:], True) * (1 - plain_cover(verts, plate, True))
    composed_mouth = plain_cover(verts, faces, False) * (1 - plain_cover(verts, plate, True))
    torch.testing.assert_close(eye.cpu(), plain_blur(composed_eye, 1.0), atol=16 * eps, rtol=0)
    torch.testing.assert_close(mouth.cpu(), plain_blur(composed_mouth, 2.0), atol=16 * eps, rtol=0)
    assert mouth.sum() > 10


@pytest.mark.parametrize("backend", ALL)
def test_correspondence_map(backend):
    device = require_backend(backend)
    verts, faces = plate_and_quad(True)
    g = torch.Generator().manual_seed(1)
    canonical = torch.randn(2, 12, 3, generator=g)
    plate, quad = torch.arange(0, 8), torch.arange(8, 12)
    out = correspondence_map(verts.to(device), faces.to(device), (SIZE, SIZE), canonical.to(device),
                             plate.to(device), quad.to(device), background=-1.0, backend=backend).cpu()
    assert out.shape == (2, 3, SIZE, SIZE)
    # plain composition: reference rasterizer, colours written out, barycentric sum by hand
    face, bary, _ = rasterize_triangles(verts, faces, (SIZE, SIZE), cull_backfaces=True, backend="torch")
    colours = canonical / 0.6
    colours[:, 8:, 2] = -0.5
    corners = faces[face.clamp(min=0)]  # [N, H, W, 3]
    picked = torch.stack([colours[n][corners[n]] for n in range(2)])  # [N, H, W, 3 corners, 3 channels]
    expected = (bary[..., None] * picked).sum(-2)
    expected = torch.where((face >= 0)[..., None], expected, torch.full_like(expected, -1.0)).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    hole = hole_pixels(2)[:, 0] > 0
    torch.testing.assert_close(out[:, 2][hole], torch.full_like(out[:, 2][hole], -0.5))
    assert (out[:, 0][~hole & (face >= 0)] != -1).all() and (out == -1).any()


def test_bad_input():
    verts, faces = plate_and_quad(True)
    quad = torch.arange(8, 12)
    with pytest.raises(ValueError, match=r"rasterize_masks: faces must index vertices in \[0, 12\)"):
        rasterize_masks(verts, faces + 5, (SIZE, SIZE), quad, quad)
    with pytest.raises(ValueError, match=r"rasterize_masks: eyeball_vertices must hold vertex indices in \[0, 12\)"):
        rasterize_masks(verts, faces, (SIZE, SIZE), quad + 4, quad)
    with pytest.raises(TypeError, match="rasterize_masks: inner_mouth_vertices must be a 1-D int32 / int64 tensor"):
        rasterize_masks(verts, faces, (SIZE, SIZE), quad, quad.float())
    with pytest.raises(ValueError, match=r"correspondence_map: canonical_vertices must have shape \[N, V, 3\]"):
        correspondence_map(verts, faces, (SIZE, SIZE), torch.zeros(2, 11, 3), quad, quad)
