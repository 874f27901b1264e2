"""Every Triton kernel compiled by Triton's real compiler to a cubin for the H100's
architecture (sm_90), in each way head4d launches it (``tests/triton_aot.py``).

Without a GPU the other Triton tests run the kernels in Triton's interpreter, which runs
code the compiler would reject (and on a GPU the tests compile only what they launch).
Here the launches of ``triton_aot.run_workload`` (each kernel module's self-check against
its reference, then the half-precision launches of the models) are recorded in the
interpreter, in one process, and every distinct launch (argument types, constexpr values,
warps and stages) is compiled ahead of time in another, with the interpreter off and a
fresh kernel cache. Runs on any machine: no GPU is needed to compile.
"""
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from conftest import require_triton_module

require_triton_module()

HERE = Path(__file__).resolve().parent
#: Every @triton.jit kernel head4d launches (helpers are compiled inside them).
KERNELS = {"head4d.kernels.triplanes._triplanes_fwd_kernel", "head4d.kernels.triplanes._triplanes_bwd_kernel",
           "head4d.kernels.decoding._decode_fwd_kernel", "head4d.kernels.decoding._decode_bwd_kernel",
           "head4d.kernels.attention._attn_fwd_kernel", "head4d.kernels.attention._attn_bwd_delta_kernel",
           "head4d.kernels.attention._attn_bwd_dkdv_kernel", "head4d.kernels.attention._attn_bwd_dq_kernel",
           "head4d.kernels.bias_act._bias_act_kernel", "head4d.kernels.upfirdn2d._upfirdn2d_kernel"}


#: Compiling processes, the launches split between them (CI has 2 cores).
WORKERS = max(2, min(8, os.cpu_count() or 2))


def _start(args, env):
    return subprocess.Popen([sys.executable, str(HERE / "triton_aot.py"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait(process, timeout):
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"{' '.join(process.args[1:3])} exited with {process.returncode}:\n{stderr[-6000:]}"


def test_every_kernel_launch_compiles_for_sm90(tmp_path):
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    specs_file = tmp_path / "launches.json"
    # record in the interpreter, on the CPU even where a GPU is present
    _wait(_start(["record", str(specs_file)], dict(base, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")), 900)
    specs = json.loads(specs_file.read_text())
    launched = {f"{s['module']}.{s['kernel']}" for s in specs}
    assert launched == KERNELS, f"missing: {KERNELS - launched}, unexpected: {launched - KERNELS}"
    dtypes = {t for s in specs for t in s["signature"].values()}
    assert {"*fp32", "*bf16", "*fp16"} <= dtypes
    # compile with the interpreter off, in a fresh cache
    shares = []
    for i in range(WORKERS):
        share = tmp_path / f"launches{i}.json"
        share.write_text(json.dumps(specs[i::WORKERS]))
        shares.append((share, tmp_path / f"compiled{i}.json"))
    env = dict(base, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    processes = [_start(["compile", str(share), str(out), "90"], env) for share, out in shares]
    for process in processes:
        _wait(process, 1800)
    results = [r for _, out in shares for r in json.loads(out.read_text())]
    assert len(results) == len(specs)
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n\n".join(f"{r['kernel']}:\n{r['error']}" for r in failed[:3])
    counts = Counter(r["kernel"].rsplit(".", 1)[1] for r in results)
    print(f"compiled {len(results)} launches for sm_90 in {sum(r['seconds'] for r in results):.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
