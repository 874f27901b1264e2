"""benchmarks/gate.py's verdicts that need no timing: a device without a baseline file
fails the gate, an empty baseline passes it (the cases themselves are stubbed out)."""
import importlib.util
import json
import pathlib

import pytest

GATE_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gate.py"


@pytest.fixture
def gate(monkeypatch):
    spec = importlib.util.spec_from_file_location("head4d_gate_under_test", GATE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module.bench, "run", lambda settings, on_result=None: [])
    return module


def test_missing_baseline_fails_with_the_file_named(gate, tmp_path, capsys):
    report = tmp_path / "report.json"
    code = gate.main(["--device-key", "no-such-device", "--baselines", str(tmp_path), "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 1
    assert "GATE FAILED: no baseline for device key 'no-such-device'" in out
    assert str(tmp_path / "no-such-device.json") in out
    assert json.loads(report.read_text())["gate"]["verdict"] == "fail: no baseline"


def test_present_baseline_with_nothing_below_its_floors_passes(gate, tmp_path, capsys):
    (tmp_path / "some-device.json").write_text(json.dumps({"device": "x", "note": "test", "floors": {}}))
    report = tmp_path / "report.json"
    code = gate.main(["--device-key", "some-device", "--baselines", str(tmp_path), "--report", str(report)])
    assert code == 0, capsys.readouterr().out
    assert json.loads(report.read_text())["gate"]["verdict"] == "pass"
