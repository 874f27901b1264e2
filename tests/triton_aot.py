"""Ahead-of-time compiles of head4d's Triton kernels with Triton's real compiler (not a
test file: ``test_triton_compile.py`` uses it).

Without a GPU the Triton kernels run in Triton's interpreter, which executes the kernel's
Python with numpy and accepts code that the compiler rejects. So the launches are recorded
in the interpreter (:func:`recorded_launches`: kernel, argument types, constexpr values and
launch options of every launch), and then each distinct launch is compiled, in a process
where the interpreter is off, to a cubin for a GPU architecture that no machine here has
(:func:`compile_launches`). Triton needs no GPU for that: its own ``ptxas`` turns the PTX
into the cubin. The launches come from :func:`run_workload`.

    TRITON_INTERPRET=1 python tests/triton_aot.py record SPECS.json
    python tests/triton_aot.py compile SPECS.json RESULTS.json [ARCH]
"""
import contextlib
import importlib
import inspect
import json
import sys
import time
import traceback
from typing import Any, Dict, Iterator, List

import torch

#: Pointer element types of Triton's signatures, by torch dtype.
POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                 torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                 torch.bool: "i1"}


def _is_constexpr(annotation) -> bool:
    # the kernels' modules may use ``from __future__ import annotations``: the annotation is then text
    return "constexpr" in (annotation if isinstance(annotation, str) else repr(annotation))


def _constexpr_value(value) -> Any:
    """A constexpr value as JSON: plain values as they are, a Triton dtype by its name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    import triton.language as tl
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    raise TypeError(f"constexpr value {value!r} of type {type(value).__name__} has no JSON form")


def launch_spec(fn, args, kwargs) -> Dict[str, Any]:
    """What one launch of ``fn`` (the kernel's Python function) compiles from: its module and
    name, the signature (runtime arguments' Triton types, ``constexpr`` for constexpr and None
    arguments), the constexpr values and the launch options (``num_warps``, ...)."""
    parameters = inspect.signature(fn).parameters
    names = list(parameters)
    options = {k: v for k, v in kwargs.items() if k not in parameters}
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in parameters})
    signature, constexprs = {}, {}
    for name in names:
        if name not in bound:
            default = parameters[name].default
            if default is inspect.Parameter.empty:
                raise TypeError(f"{fn.__name__}: argument {name} was not passed")
            bound[name] = default
        value = bound[name]
        if _is_constexpr(parameters[name].annotation) or value is None:
            signature[name] = "constexpr"
            constexprs[name] = _constexpr_value(value)
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__} has no Triton type")
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": {k: v for k, v in options.items() if isinstance(v, (int, bool))}}


@contextlib.contextmanager
def recorded_launches() -> Iterator[List[Dict[str, Any]]]:
    """Inside, every kernel launched in Triton's interpreter (``TRITON_INTERPRET=1`` set
    before Triton was imported) runs as usual and its :func:`launch_spec` is appended to the
    list yielded, once per distinct spec."""
    from triton.runtime.interpreter import InterpretedFunction

    specs: List[Dict[str, Any]] = []
    seen = set()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        spec = launch_spec(self.fn, args, kwargs)
        key = json.dumps(spec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            specs.append(spec)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield specs
    finally:
        InterpretedFunction.run = original


def compile_launches(specs: List[Dict[str, Any]], arch: int = 90) -> List[Dict[str, Any]]:
    """Compile each spec to a cubin for ``sm_<arch>``; one result a spec: ``ok``, the
    seconds taken, and the error's last lines where it failed. Must run with the
    interpreter off (``triton.jit`` then makes compilable functions)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    results = []
    for spec in specs:
        kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        constexprs = {k: getattr(tl, v["tl_dtype"]) if isinstance(v, dict) else v for k, v in spec["constexprs"].items()}
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(kernel, signature=spec["signature"], constexprs=constexprs),
                                      target=target, options=spec["options"])
            ok, error = "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0, ""
        except Exception:  # noqa: BLE001 - reported per spec
            ok, error = False, traceback.format_exc()[-3000:]
        results.append({"kernel": f"{spec['module']}.{spec['kernel']}", "ok": ok, "error": error,
                        "seconds": round(time.perf_counter() - start, 2)})
    return results


#: The kernel modules (head4d.kernels.<name>), each with a ``_self_check(device)``.
KERNEL_MODULES = ("triplanes", "decoding", "attention", "bias_act", "upfirdn2d")


def run_workload() -> None:
    """Launch every kernel the ways head4d launches them, on small CPU tensors in the
    interpreter: each kernel module's own self-check (float32 and float64, the layouts,
    reductions, activations, head dimensions and resampling cases), then the half-precision
    launches the models make (bfloat16 and float16 triplanes at 32 channels, attention,
    bias_act and upfirdn2d)."""
    modules = {name: importlib.import_module(f"head4d.kernels.{name}") for name in KERNEL_MODULES}
    cpu = torch.device("cpu")
    for module in modules.values():
        module._self_check(cpu)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        planes = torch.randn(1, 3, 32, 8, 8, generator=gen).to(dtype)
        points = torch.rand(1, 50, 3, generator=gen) - 0.5
        for layout in (0, 1):
            out = modules["triplanes"].forward(planes, points, 2.0, layout, 0)
            modules["triplanes"].backward(torch.randn_like(out), planes, points, 2.0, layout, 0, True, True)
        for d in (64, 256):
            q, k, v = (torch.randn(1, 2, n, d, generator=gen).to(dtype) for n in (9, 5, 5))
            out, lse = modules["attention"].forward(q, k, v, d ** -0.5)
            modules["attention"].backward(torch.randn_like(out), q, k, v, out, lse, d ** -0.5)
        x = torch.randn(2, 4, 3, 5, generator=gen).to(dtype)
        b = torch.randn(4, generator=gen).to(dtype)
        lrelu = modules["bias_act"].LRELU
        for order in (0, 1, 2):
            modules["bias_act"].run(x, b, None if order == 0 else x, 1, lrelu, order, 0.2, 2 ** 0.5, 256.0)
        f = torch.tensor([1.0, 3.0, 3.0, 1.0])
        f = torch.outer(f, f) / 64
        image = torch.randn(1, 2, 8, 8, generator=gen).to(dtype)
        modules["upfirdn2d"].forward(image, f, 2, 2, 1, 1, 2, 1, 2, 1, False, 4.0)
        modules["upfirdn2d"].forward(image, f, 1, 1, 2, 2, 1, 1, 1, 1, False, 1.0)


if __name__ == "__main__":
    # python tests/triton_aot.py record OUT          (with TRITON_INTERPRET=1)
    # python tests/triton_aot.py compile SPECS OUT [ARCH]
    if sys.argv[1] == "record":
        with recorded_launches() as recorded:
            run_workload()
        with open(sys.argv[2], "w") as f:
            json.dump(recorded, f)
    elif sys.argv[1] == "compile":
        with open(sys.argv[2]) as f:
            launches = json.load(f)
        with open(sys.argv[3], "w") as f:
            json.dump(compile_launches(launches, int(sys.argv[4]) if len(sys.argv) > 4 else 90), f)
    else:
        raise SystemExit("usage: triton_aot.py record OUT | compile SPECS OUT [ARCH]")
