"""The GPU benchmark's harness, on the CPU: its train.py runs, the stop at the target, MFU and the table.
(The figures themselves come from a GPU and live in BENCHMARKS.md.)"""

import json

import pytest
import torch

from nanollm import bench_gpu
from nanollm.bench_gpu import datasheet_peak, markdown, timed_run, with_utilisation
from tests.conftest import SAMPLE


def test_a_run_stops_at_the_first_full_validation_below_the_target(tmp_path):
    # nano on the sample validates at 3.83, 3.49, 3.11, 2.87 over its first 40 steps: 3.3 is passed at step 30.
    overrides = "model=nano trainer.max_steps=40 trainer.val_check_interval=10 trainer.log_every_n_steps=5"
    row = timed_run("nano", overrides, SAMPLE, tmp_path, target=3.3, timeout=180)
    assert "error" not in row, row
    history = row["val_history"]
    assert row["steps"] < 40 and row["reached_step"] == row["steps"] == history[-1]["step"]
    assert history[-1]["val_loss"] < 3.3 <= min(h["val_loss"] for h in history[:-1])
    assert all(h["full_pass"] for h in history) and row["final_val_loss"] == history[-1]["val_loss"]
    assert 0 < row["first_step_seconds"] < row["seconds"] and row["tokens_per_second"] > 0
    assert row["parameters"] > 0 and row["flops_per_token"] > 6 * row["parameters"]


def test_utilisation_is_model_flops_over_each_known_peak_and_the_table_names_misses():
    row = {"name": "a", "overrides": "x=1", "flops_per_token": 1000, "tokens_per_second": 5e8, "parameters": 2e6}
    row.update(steps=700, reached_step=None, first_step_seconds=12.0, seconds=40.0, final_val_loss=1.48)
    rated = with_utilisation(row, {"datasheet": 1e12, "measured": None})
    assert rated["mfu_datasheet"] == 0.5 and "mfu_measured" not in rated
    report = {"date": "d", "device": "GPU", "software": "s", "command": "c", "target": 1.47}
    report.update(
        peaks={"datasheet": 1e12, "measured": 8e11},
        runs=[rated, {"name": "b", "overrides": "y=2", "error": "still running"}],
    )
    table = markdown(report)
    assert "| a | 2.0M | 500,000,000 | 50.0% | 12.0 s | not reached (700 steps) | 40.0 s | 1.4800 |" in table
    assert "| b |" in table and "still running" in table


def test_datasheet_peaks_go_by_the_most_specific_name():
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert datasheet_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert datasheet_peak("Tesla T4") is None


def test_without_a_gpu_it_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        bench_gpu.main([])
    assert str(stopped.value).startswith("error: no CUDA GPU") and "nanollm.bench" in str(stopped.value)


def test_the_report_is_written_after_every_run_and_with_no_runs_at_all(monkeypatch, tmp_path, capsys):
    # main's own flow, with the GPU's answers stood in for (timed_run is tested above through train.py).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(bench_gpu, "bf16_matmul_peak", lambda: 8e14)
    seen = []

    def fake_run(name, overrides, data, work, target, timeout):
        seen.append((name, overrides, target))
        return {"name": name, "overrides": overrides, "error": "still running after 1 s"}

    monkeypatch.setattr(bench_gpu, "timed_run", fake_run)
    out = tmp_path / "gpu.md"
    bench_gpu.main(["--configs", "shakespeare_char", "--run", "mine=model=nano trainer.max_steps=9", "--out", str(out)])
    assert seen == [
        ("shakespeare_char", "experiment=shakespeare_char", 1.47),
        ("mine", "model=nano trainer.max_steps=9", 1.47),
    ]
    assert "| mine |" in out.read_text() and len(json.loads(out.with_suffix(".json").read_text())["runs"]) == 2
    bench_gpu.main(["--configs", ""])
    assert "datasheet 989 TFLOP/s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--configs", "large,nope"], "unknown --configs nope; choose from"),
        (["--run", "mine"], "--run takes NAME='OVERRIDES'"),
    ],
)
def test_a_mistyped_run_is_named_before_the_gpu_check(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the typo, not the machine, is the error
    with pytest.raises(SystemExit) as exit_:
        bench_gpu.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
