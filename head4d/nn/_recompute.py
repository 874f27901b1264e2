"""Recomputation in the backward: a sub-network that keeps only its inputs for the
backward and runs its forward again there, instead of keeping its intermediate maps.

Training memory is mostly the activations autograd keeps between the forward and the
backward. A layer such as StyleGAN2's unfused modulated convolution followed by
``bias_act`` keeps three or four maps of its output's size (the modulated input, the
convolution's output, the pre-activation); recomputed, it keeps only its input, which
the layer before it keeps anyway. The price is one more forward of the layer in the
backward. The values are the same: the forward runs the same ops on the same inputs,
and the gradients are those of that same composition.

:func:`recompute` is the mechanism; :func:`recompute_wanted` says when a module takes it:
only when autograd records (grad mode on and an input requiring grad), not while
``torch.compile`` traces, and never when the module's ops run on the ``torch`` backend
(the plain-PyTorch references): that path is the baseline the fast backends are measured
against, and stays as it is.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from .. import _backend

__all__ = ["recompute", "recompute_wanted"]


def _reference_requested(backend: Optional[str]) -> bool:
    """Whether the ops of a module with ``backend=`` run on the ``torch`` references: the
    argument when set, else the enclosing :func:`head4d._backend.backend_scope`, else
    the ``HEAD4D_BACKEND`` environment variable (the order the ops resolve it in)."""
    if backend is not None and backend != "auto":
        return backend == "torch"
    scoped = _backend._SCOPED_BACKEND.get()
    if scoped is not None:
        return scoped == "torch"
    return os.environ.get("HEAD4D_BACKEND") == "torch"


def recompute_wanted(backend: Optional[str], *tensors: Optional[torch.Tensor]) -> bool:
    """Whether a module whose ops run with ``backend=`` (None: the scope's or the default)
    recomputes its forward in the backward for these inputs: autograd records (grad
    mode on, one of ``tensors`` requires grad), nothing is being traced by
    ``torch.compile``, and the ops do not run on the ``torch`` references."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if not any(t is not None and t.requires_grad for t in tensors):
        return False
    return not _reference_requested(backend)


class _Recomputed(torch.autograd.Function):
    """``fn(*inputs)`` keeping only ``inputs`` for the backward (see :func:`recompute`)."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.fn = fn
        ctx.scope = _backend._SCOPED_BACKEND.get()
        device_type = next(t.device.type for t in inputs if t is not None)
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.save_for_backward(*inputs)
        return fn(*inputs)  # autograd.Function runs the forward with grad mode off

    @staticmethod
    def backward(ctx, grad_output):
        inputs = ctx.saved_tensors
        create_graph = torch.is_grad_enabled()  # a double backward: keep the saved inputs' history
        if not create_graph:
            inputs = tuple(None if t is None else t.detach().requires_grad_(t.requires_grad) for t in inputs)
        wanted = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad and ctx.needs_input_grad[i + 1]]
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        # the backward may run on another thread (outside the forward's backend scope)
        with torch.enable_grad(), _backend.backend_scope(ctx.scope), \
                torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
            output = ctx.fn(*inputs)
        grads = torch.autograd.grad(output, [inputs[i] for i in wanted], grad_output, create_graph=create_graph,
                                    allow_unused=True) if wanted else ()
        result = [None] * len(inputs)
        for i, grad in zip(wanted, grads):
            result[i] = grad
        return (None, *result)


def recompute(fn: Callable[..., torch.Tensor], *inputs: Optional[torch.Tensor]) -> torch.Tensor:
    """``fn(*inputs)``, keeping only ``inputs`` for the backward: the backward runs ``fn``
    again (grad mode on, in the forward's backend scope and autocast state) and takes the
    gradients of that.

    Args:
        fn: a function of ``inputs`` alone returning one tensor, deterministic (no random
            draws: pass noise in as an input), whose differentiable tensors all come in
            through ``inputs`` (a tensor it captures gets no gradient); any other
            captured values (buffers, settings) must not change before the backward.
        *inputs: tensors (or None) on one device; the ones requiring grad get gradients.

    Returns:
        ``fn(*inputs)``, differentiable w.r.t. ``inputs`` to any order (a double backward
        recomputes with the inputs' history, so second derivatives reach what produced
        them).
    """
    return _Recomputed.apply(fn, *inputs)

