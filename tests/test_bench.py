"""The benchmark library (head4d.bench), the backend order derived from a run
(head4d.bench.order) and the order file's reader (head4d._preferences)."""
import json
import math
import os

import pytest
import torch

from head4d import _preferences, bench
from head4d.bench import order
from head4d.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def case_keys(settings):
    return {case.key(pass_, backend) for case in bench.cases(settings)
            for pass_ in case.passes for backend in case.backends}


# ----------------------------------------------------------------------------------
# Cases and modes
# ----------------------------------------------------------------------------------

def test_every_cpu_floor_names_a_case_of_the_gate_modes():
    """The gate runs the full mode (and --quick the quick one): each floor must name a
    (op, pass, shape, backend) one of them produces, or it is silently skipped."""
    with open(os.path.join(ROOT, "benchmarks", "baselines", "cpu.json")) as f:
        baseline = json.load(f)
    reachable = (case_keys(bench.Settings(device=CPU, full=True))
                 | case_keys(bench.Settings(device=CPU, quick=True)))
    floors = list(baseline["floors"]) + list(baseline.get("memory_floors", {}))
    missing = [key for key in floors if key not in reachable]
    assert not missing, f"gate floors no benchmark case produces: {missing}"


def test_default_mode_on_the_cpu_runs_the_small_shapes():
    default = bench.Settings(device=CPU)
    assert default.small and not bench.Settings(device=CPU, full=True).small
    assert case_keys(default) == case_keys(bench.Settings(device=CPU, quick=True))
    assert case_keys(default).isdisjoint(case_keys(bench.Settings(device=CPU, full=True)) -
                                         case_keys(bench.Settings(device=CPU, quick=True)))


def test_the_small_cpu_shapes_leave_out_the_whole_deformation():
    """Its reference rebuilds the 24^3 surface field on every call, minutes on a busy CPU."""
    assert "deform" not in {c.op for c in bench.cases(bench.Settings(device=CPU))}
    assert "deform" in {c.op for c in bench.cases(bench.Settings(device=CPU, full=True))}


def test_full_mode_on_cuda_adds_batch_four_and_keeps_the_default_cases():
    cuda = torch.device("cuda")  # building cases allocates nothing on the device
    default = bench.cases(bench.Settings(device=cuda))
    full = bench.cases(bench.Settings(device=cuda, full=True))
    assert {(c.op, c.shape) for c in default} < {(c.op, c.shape) for c in full}
    assert not any("N4_" in c.shape for c in default)
    assert any("N4_" in c.shape for c in full)


def test_genhead_cases_time_the_released_config_on_cuda_and_measure_memory_at_batch_four():
    cuda = torch.device("cuda")  # building cases allocates nothing on the device
    full = [c for c in bench.cases(bench.Settings(device=cuda, full=True), ["genhead", "genhead_render"])]
    shapes = {(c.op, c.shape) for c in full}
    assert shapes == {("genhead", "N1_img512_R64_S48+48_planes256_base32768_fp32"),
                      ("genhead", "N4_img512_R64_S48+48_planes256_base32768_fp32"),
                      ("genhead_render", "N1_R64x64_S48+48_planes256_fp32"),
                      ("genhead_render", "N4_R64x64_S48+48_planes256_fp32")}
    for case in full:
        assert case.backends == ("cuda",) and case.measure_memory and case.passes == ("fwd", "fwd+bwd")
        assert case.op in bench.WHOLE_MODELS
    genhead = next(c for c in full if c.op == "genhead")
    # every parameter the forward reads is differentiated (the SR's noise strengths are not read)
    from head4d.models import GenHead

    names = [k for k, _ in GenHead().named_parameters()]
    unread = [k for k in names if k.startswith("superresolution.") and k.endswith("noise_strength")]
    assert unread and list(genhead.grad_of) == [k for k in names if k not in unread]


def test_genhead_render_case_agrees_with_its_reference_on_the_cpu():
    from head4d.bench.harness import check, prepare, step

    (case,) = bench.cases(bench.Settings(device=CPU), ["genhead_render"])
    inputs = prepare(case, case.make_inputs(CPU, 0), "fwd+bwd")
    expected = [t.detach() for t in step(case, "fwd+bwd", bench.REFERENCE)(inputs)]
    ok, errors = check(case, "fwd+bwd", "cpu", inputs, expected)
    assert ok, errors
    assert set(errors) == {"out"} | {f"grad_{k}" for k in case.grad_of}
    assert expected[0].std() > 0 and all(g.abs().sum() > 0 for g in expected[1:])


def test_genhead_fused_case_meets_the_memory_goal_on_the_cpu():
    """The CPU's ``genhead`` memory case (GenHeadConfig.fused=True, fwd+bwd only) agrees
    with its reference and keeps at most half the bytes the reference keeps for the
    backward; the default case beside it decodes unfused (the CPU's faster path)."""
    from head4d.bench.harness import check, measure_memory, prepare, step

    cases = {c.shape: c for c in bench.cases(bench.Settings(device=CPU), ["genhead"])}
    fused = [c for shape, c in cases.items() if shape.endswith("_fused")]
    assert len(fused) == 1 and len(cases) == 2
    (case,) = fused
    assert case.passes == ("fwd+bwd",) and case.measure_memory
    assert cases[case.shape[: -len("_fused")]].passes == ("fwd", "fwd+bwd")
    inputs = prepare(case, case.make_inputs(CPU, 0), "fwd+bwd")
    expected = [t.detach() for t in step(case, "fwd+bwd", bench.REFERENCE)(inputs)]
    ok, errors = check(case, "fwd+bwd", "cpu", inputs, expected)
    assert ok, errors
    saved_ref, _ = measure_memory(case, "fwd+bwd", bench.REFERENCE, inputs, CPU)
    saved_fused, _ = measure_memory(case, "fwd+bwd", "cpu", inputs, CPU)
    assert 2 * saved_fused <= saved_ref, (saved_fused, saved_ref)


RECONSTRUCTOR_OPS = ("reconstructor_encode", "reconstructor_reenact", "reconstructor_train", "decoder_attention")


def test_reconstructor_cases_time_the_released_sizes_on_cuda_without_building_a_model():
    """The issue's batches (re-enactment at 1 and 8, training at 4) in the full mode, the
    gate's; N = 1 in the default mode."""
    from head4d.bench.op_cases import reconstructor

    cuda = torch.device("cuda")  # building cases allocates nothing on the device
    built = dict(reconstructor._TEMPLATES)
    shared = {("reconstructor_encode", "encode_N1_src512_fp32"),
              ("reconstructor_reenact", "reenact_N1_src512_R128_S48+48_img512_fp32"),
              ("decoder_attention", "B1_H2_Lq16384_Lk4096_D512_fp32"),
              ("decoder_attention", "B1_H2_Lq16384_Lk4096_D512_bf16")}
    expected = {False: shared | {("reconstructor_train", "train_N1_src512_R128_S48+48_img512_fp32")},
                True: shared | {("reconstructor_reenact", "reenact_N8_src512_R128_S48+48_img512_fp32"),
                                ("reconstructor_train", "train_N1_src512_R128_S48+48_img512_fp32"),
                                ("reconstructor_train", "train_N4_src512_R128_S48+48_img512_fp32")}}
    for full in (False, True):
        cases = bench.cases(bench.Settings(device=cuda, full=full), RECONSTRUCTOR_OPS)
        assert {(c.op, c.shape) for c in cases} == expected[full]
        for case in cases:
            assert case.op in bench.WHOLE_MODELS  # none of them sets an op's backend order
            if case.op == "decoder_attention":
                assert case.backends == ("triton", "sdpa") and case.passes == ("fwd", "fwd+bwd")
                # float32: TF32 products, the attention tests' 32 units of roundoff
                assert case.tol() == (32 * 2.0 ** -11 if case.dtype == torch.float32 else 1e-2)
            else:
                assert case.tol() == 32 * 2.0 ** -11
                assert case.backends == ("cuda",)
                assert case.measure_memory == (case.op == "reconstructor_train")
                assert case.passes == (("fwd+bwd",) if case.op == "reconstructor_train" else ("fwd",))
    assert reconstructor._TEMPLATES == built  # the parameter names resolve on first use


def test_reconstructor_cases_run_at_a_tiny_size_and_report_ratios():
    """Every new case at a 64^2 source, 16^2 rendering with 6 + 6 samples: checked against the
    reference and timed (a finite speedup), and the training step's gradients of every
    parameter it reads agree, with head4d's fused path keeping at most 60% of the bytes the
    reference keeps for the backward (the memory ratio the gate reads), and the per-stage
    account of those bytes sums to the harness's count."""
    from head4d.bench.harness import check, measure_memory, prepare, step
    from head4d.bench.op_cases import reconstructor
    from head4d.models import ReconstructorConfig

    config = ReconstructorConfig(source_resolution=64, neural_rendering_resolution=16, depth_resolution=6,
                                 depth_resolution_importance=6, fine_resolution=8, coarse_resolution=4)
    (attention,) = bench.cases(bench.Settings(device=CPU), ["decoder_attention"])
    for case in (attention, reconstructor.encode_case(1, False, config), reconstructor.reenact_case(1, False, config)):
        rows = bench.run_case(case, CPU, budget_s=0.01)
        assert rows and all(r.status == "ok" for r in rows), [(r.key, r.status, r.message) for r in rows]
        assert all(math.isfinite(r.speedup) and r.speedup > 0 for r in rows)
        assert {r.backend for r in rows} == {"torch"} | set(case.backends)

    train = reconstructor.train_case(1, False, config)
    inputs = prepare(train, train.make_inputs(CPU, 0), "fwd+bwd")
    names = [k for k, _ in reconstructor.template(CPU, config).named_parameters()]
    unread = [k for k in names if k.startswith("superresolution.") and k.endswith("noise_strength")]
    assert unread and list(train.grad_of) == [k for k in names if k not in unread]
    expected = [t.detach() for t in step(train, "fwd+bwd", bench.REFERENCE)(inputs)]
    ok, errors = check(train, "fwd+bwd", "cpu", inputs, expected)
    assert ok, {k: v for k, v in errors.items() if v > train.tol()}
    assert len(errors) == 1 + len(names) - len(unread)
    assert expected[0].std() > 0 and sum(bool(g.abs().sum() > 0) for g in expected[1:]) == len(expected) - 1
    saved_cpu, _ = measure_memory(train, "fwd+bwd", "cpu", inputs, CPU)
    by_stage = {backend: reconstructor.saved_bytes_by_stage(train, backend, inputs, config)
                for backend in (bench.REFERENCE, "cpu")}
    assert sum(by_stage["cpu"].values()) == saved_cpu
    # the goal: at most 60% of the reference's (the StyleGAN2 layers and the Mix-FFN
    # recompute their forward in the backward; measured 39% at this size)
    assert 0 < saved_cpu <= 0.6 * sum(by_stage[bench.REFERENCE].values())
    assert {"encoder_global", "encoder_detail", "background", "encoder_canonical.trans_blocks_neutral",
            "encoder_canonical.trans_blocks_motion", "generator_triplane", "renderer",
            "superresolution"} <= set(by_stage["cpu"])
    # the fused decode keeps less than its reference (the whole renderer's memory floor): the
    # reference decodes unfused, so its decoder's activations count in its own stage
    rendering = {b: by_stage[b]["renderer"] + by_stage[b].get("decoder", 0) for b in by_stage}
    assert "decoder" not in by_stage["cpu"] and "decoder" in by_stage[bench.REFERENCE]
    assert rendering["cpu"] < rendering[bench.REFERENCE] / 2


def test_settings_reject_two_modes_and_bad_batches():
    with pytest.raises(ValueError, match="quick and full"):
        bench.Settings(device=CPU, quick=True, full=True)
    with pytest.raises(ValueError, match="batches"):
        bench.Settings(device=CPU, batches=(0,))


def test_the_default_budget_is_shorter_than_the_full_one():
    assert bench.default_budget(CPU) < bench.default_budget(CPU, full=True)
    cuda = torch.device("cuda")
    assert bench.default_budget(cuda) < bench.default_budget(cuda, full=True)


def test_unknown_op_is_named():
    with pytest.raises(ValueError, match="no_such_op"):
        bench.cases(bench.Settings(device=CPU), ["no_such_op"])


# ----------------------------------------------------------------------------------
# The harness on a small made-up op
# ----------------------------------------------------------------------------------

def scaled_case(wrong_by: float) -> bench.Case:
    """``2 x`` on 1,000 random values; the ``cpu`` backend adds ``wrong_by``."""
    def make_inputs(device, seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        return {"x": torch.randn(1000, generator=gen, device=device),
                "grad_out": torch.randn(1000, generator=gen, device=device)}

    def run(inputs, backend):
        out = inputs["x"] * 2
        return out if backend == bench.REFERENCE else out + wrong_by

    return bench.Case(op="scale", shape="M1000_fp32", make_inputs=make_inputs, run=run, grad_of=("x",),
                      nbytes={"fwd": 8000, "fwd+bwd": 16000}, flops={"fwd": 1000, "fwd+bwd": 2000},
                      dtype=torch.float32, backends=("cpu",))


def test_run_case_times_a_correct_backend_and_rejects_a_wrong_one():
    right = bench.run_case(scaled_case(0.0), CPU, budget_s=0.01)
    assert [(r.pass_, r.backend, r.status) for r in right] == [
        ("fwd", "torch", "ok"), ("fwd", "cpu", "ok"), ("fwd+bwd", "torch", "ok"), ("fwd+bwd", "cpu", "ok")]
    for r in right:
        assert r.median_ms > 0 and r.reps >= 3 and math.isfinite(r.speedup)
    wrong = bench.run_case(scaled_case(1e-3), CPU, budget_s=0.01)
    cpu_rows = [r for r in wrong if r.backend == "cpu"]
    assert [r.status for r in cpu_rows] == ["fail", "fail"]
    assert all(r.median_ms is None and "rel. error" in r.message for r in cpu_rows)


# ----------------------------------------------------------------------------------
# Backend order from a run
# ----------------------------------------------------------------------------------

def row(op, shape, pass_, backend, speedup, status="ok"):
    return {"op": op, "shape": shape, "pass": pass_, "backend": backend, "status": status,
            "speedup": speedup if status == "ok" else None}


def test_order_ranks_by_weighted_speedup_with_the_backward_counting_double():
    rows = [row("op_a", "s1", "fwd", "torch", 1.0), row("op_a", "s1", "fwd", "cuda", 3.0),
            row("op_a", "s1", "fwd", "triton", 1.5),
            row("op_a", "s1", "fwd+bwd", "torch", 1.0), row("op_a", "s1", "fwd+bwd", "cuda", 1.2),
            row("op_a", "s1", "fwd+bwd", "triton", 2.0)]
    # cuda: (log 3 + 2 log 1.2) / 3 = 0.488; triton: (log 1.5 + 2 log 2) / 3 = 0.597
    orders, notes = order.derive_orders(rows, "cuda")
    assert orders == {"op_a": ["triton", "cuda", "torch"]} and notes == []


def test_order_puts_a_slower_backend_after_the_reference():
    rows = [row("op_a", "s", "fwd", "torch", 1.0), row("op_a", "s", "fwd", "cuda", 0.8)]
    assert order.derive_orders(rows, "cuda")[0] == {"op_a": ["torch", "cuda"]}


def test_order_leaves_out_wrong_failed_and_unrun_backends_and_whole_models():
    rows = [row("op_a", "s1", "fwd", "torch", 1.0), row("op_a", "s1", "fwd", "cuda", 5.0),
            row("op_a", "s2", "fwd", "torch", 1.0), row("op_a", "s2", "fwd", "cuda", None, "fail"),
            row("op_a", "s1", "fwd", "triton", None, "skip"), row("op_a", "s1", "fwd", "sdpa", None, "error"),
            row("render", "s", "fwd", "torch", 1.0), row("render", "s", "fwd", "cuda", 9.0)]
    assert "render" in bench.WHOLE_MODELS
    orders, notes = order.derive_orders(rows, "cuda")
    assert orders == {"op_a": ["torch"]}
    assert len(notes) == 3 and any("cuda left out, fail" in n for n in notes)


def test_write_orders_replaces_its_device_type_and_keeps_the_rest(tmp_path):
    path = str(tmp_path / "order.json")
    with open(path, "w") as f:
        json.dump({"orders": {"op_a": {"cpu": ["cpu", "torch"], "cuda": ["torch"]},
                              "op_b": {"cuda": ["cuda", "torch"]}}, "sources": {"cpu": {"device": "x"}}}, f)
    rows = [row("op_a", "s", "fwd", "torch", 1.0), row("op_a", "s", "fwd", "cuda", 2.0)]
    data, _ = order.write_orders(path, rows, {"device_type": "cuda", "device": "H100", "git_commit": "abc"})
    with open(path) as f:
        assert json.load(f) == data
    assert data["orders"] == {"op_a": {"cpu": ["cpu", "torch"], "cuda": ["cuda", "torch"]},
                              "op_b": {"cuda": ["cuda", "torch"]}}
    assert data["sources"]["cpu"] == {"device": "x"} and data["sources"]["cuda"]["device"] == "H100"
    loaded = _preferences.load_orders.__wrapped__(path)
    assert loaded["op_a"]["cuda"] == ("cuda", "torch")


def test_cli_writes_the_order_of_a_saved_run(tmp_path, capsys):
    saved = tmp_path / "bench.json"
    rows = [row("op_a", "s", "fwd+bwd", "torch", 1.0), row("op_a", "s", "fwd+bwd", "cpu", 1.5)]
    saved.write_text(json.dumps({"environment": {"device_type": "cpu", "device": "test"}, "results": rows}))
    out = tmp_path / "order.json"
    assert cli_main(["bench", "--from-json", str(saved), "--write-order", str(out)]) == 0
    assert json.loads(out.read_text())["orders"] == {"op_a": {"cpu": ["cpu", "torch"]}}
    saved.write_text(json.dumps({"rows": []}))
    assert cli_main(["bench", "--from-json", str(saved), "--write-order", str(out)]) == 2
    assert "'results' and 'environment'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["bench", "--quick", "--full"])


# ----------------------------------------------------------------------------------
# The order file's reader
# ----------------------------------------------------------------------------------

BUILTIN = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}


def test_merge_puts_the_measured_order_first_and_keeps_the_other_builtin_backends():
    assert _preferences.merge_order(BUILTIN, {"cuda": ("triton", "torch")}) == {
        "cpu": ("cpu", "torch"), "cuda": ("triton", "torch", "cuda")}
    assert _preferences.merge_order(BUILTIN, {}) == BUILTIN


def test_the_committed_order_file_is_valid_and_unnamed_ops_keep_their_builtin_order():
    orders = _preferences.load_orders(_preferences.ORDER_FILE)
    assert isinstance(orders, dict)
    assert _preferences.backend_order("no_such_op", BUILTIN) == BUILTIN


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"orders": {"op": {"tpu": ["torch"]}}}', "device type 'tpu'"),
    ('{"orders": {"op": {"cuda": ["cuda", "cuda"]}}}', "distinct backends"),
    ('{"orders": {"op": {"cuda": ["warp"]}}}', "distinct backends"),
    ('{"orders": ["op"]}', "expected an object with 'orders'"),
])
def test_a_malformed_order_file_is_named_with_what_was_expected(tmp_path, content, message):
    path = tmp_path / "order.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        _preferences.load_orders.__wrapped__(str(path))
    assert str(path) in str(info.value)


def test_a_missing_order_file_means_no_measured_orders(tmp_path):
    assert _preferences.load_orders.__wrapped__(str(tmp_path / "absent.json")) == {}


def test_training_step_case_repeats_one_step_and_agrees_with_its_reference():
    """The ``train_genhead`` case on the tiny training config: a whole step (pass ``step``)
    on head4d's kernels against the same step with every op on its reference, within the
    step tolerance; every call restores the snapshot (the optimizers' moments included),
    so a call repeats bit for bit, and a new seed gives other losses."""
    from head4d.bench.harness import prepare, step
    from head4d.bench.op_cases import training
    from head4d.train.genhead import GenHeadTrainingConfig

    case = training.train_genhead_case(2, False, reg=True, config=GenHeadTrainingConfig.small(device="cpu"))
    assert case.passes == (bench.STEP_PASS,)
    one, other = (prepare(case, case.make_inputs(CPU, seed), bench.STEP_PASS) for seed in (0, 1))
    run = step(case, bench.STEP_PASS, "cpu")
    first, again, moved = run(one)[0], run(one)[0], run(other)[0]
    # the all-phase step reports every phase's losses, sorted by name
    names = sorted(case.run.__self__.trainer(CPU).last_losses)
    assert {"Loss/G/loss", "Loss/G/TVloss", "Loss/D/loss", "Loss/D/reg"} <= set(names)
    assert first.shape == (len(names),) and bool(torch.isfinite(first).all())
    assert torch.equal(first, again) and not torch.equal(first, moved)
    reference = step(case, bench.STEP_PASS, bench.REFERENCE)(one)[0]
    assert bench.rel_err(first, reference) <= training.STEP_TOLERANCE
    assert not torch.equal(first, reference)  # the two sides did run different kernels


def test_training_cases_time_batch_eight_and_four_on_cuda_without_building_a_trainer():
    cuda = torch.device("cuda")  # building cases builds no trainer and allocates nothing
    full = bench.cases(bench.Settings(device=cuda, full=True), ["train_genhead", "train_reconstructor"])
    assert {(c.op, c.shape.split("_")[0]) for c in full} == {("train_genhead", "N2"), ("train_genhead", "N8"),
                                                              ("train_reconstructor", "N1"), ("train_reconstructor", "N4")}
    assert all(c.passes == (bench.STEP_PASS,) and c.measure_memory and c.op in bench.WHOLE_MODELS for c in full)
    assert any(c.shape.endswith("_reg") for c in full)
