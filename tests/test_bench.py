"""The benchmark harness (tiny settings here; the real measurements live in BENCHMARKS.md)."""

from nanollm import bench
from nanollm.bench import long_generation_rows, markdown, scoring_table, whole_process_summary


def test_bench_runs_end_to_end_and_both_paths_reach_the_same_validation_loss(tmp_path):
    out = tmp_path / "table.md"
    # The parts that time things (scoring, first step, data) are left out: their figures belong in BENCHMARKS.md.
    args = ["--steps", "12", "--rounds", "1", "--presets", "nano", "--corpus-mb", "0", "--whole-rounds", "0"]
    args += ["--reference-steps", "8", "--activation-steps", "2", "--gen-tokens", "16"]
    args += ["--long-gen", "80", "--gen-rounds", "2"]
    args += ["--out", str(out)]
    args += ["--skip-scoring", "--skip-first-step"]
    bench.main(args)  # what `python -m nanollm.bench ...` runs, in this process
    table = out.read_text()
    headings = ("Training throughput", "Feed-forward activation", "The same training on both paths", "Long generation")
    for heading in (*headings, "KV cache"):
        assert heading in table, heading
    # Same model, batches, optimizer and schedule on both paths: the same final validation loss.
    losses = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in table.splitlines()
        if line.startswith("| Lightning (train.py path)") or line.startswith("| bare loop |")
    }
    assert len(losses) == 2 and len(set(losses.values())) == 1, table


def test_whole_process_ratios_are_per_round_and_their_median():
    runs = {
        "bare": [{"seconds": 100.0, "val_loss": 1.88}, {"seconds": 80.0, "val_loss": 1.88}],
        "train.py": [{"seconds": 101.0, "val_loss": 1.78}, {"seconds": 84.0, "val_loss": 1.78}],
        "speedrun": [{"seconds": 30.0, "val_loss": 1.85}, {"seconds": 32.0, "val_loss": 1.85}],
    }
    summary = whole_process_summary({"runs": runs, "rounds": 2, "steps": 2000})
    assert summary["ratios"]["train.py"] == [1.01, 1.05] and summary["median_ratio"]["train.py"] == 1.03
    assert summary["median"]["bare"] == 90.0 and summary["median_ratio"]["speedrun"] == (0.3 + 0.4) / 2
    report = {
        "date": "today",
        "machine": "m",
        "command": "c",
        "rounds": 1,
        "whole": {"runs": runs, "rounds": 2, "steps": 2000},
        "throughput": [
            {"config": "nano", "parameters": 1, "tokens_per_step": 1, "lightning_tokens_per_s": 1.0,
             "bare_tokens_per_s": 1.0, "lightning_ms_per_step": 1.0, "bare_ms_per_step": 1.0, "ratio": 1.0,
             "mfu": 0.1, "peak_gflops": 1.0}
        ],
        "generation": {"cache": [2.0], "no_cache": [1.0], "speedup": [2.0], "tokens": 1},
        "first_step_seconds": 1.0,
    }  # fmt: skip
    table = markdown(report)
    assert "| train.py, the same recipe with its defaults | 92.5 | 101.0, 84.0 | 1.030 (1.010, 1.050) |" in table
    assert "| speed-up | 2.0x (2.0x) |" in table


def test_long_generation_rows_give_medians_and_each_rounds_ratio_to_recompute():
    every = {"recompute": [100.0, 80.0, 120.0], "rolling KV cache": [300.0, 320.0, 240.0]}
    assert long_generation_rows(every) == [
        ("recompute", "100 (100, 80, 120)", "1.0x (1.0x, 1.0x, 1.0x)"),
        ("rolling KV cache", "300 (300, 320, 240)", "3.0x (3.0x, 4.0x, 2.0x)"),
    ]


def test_scoring_table_sets_each_path_with_kept_memory_against_glibcs_defaults():
    evaluation = {
        "glibc defaults": {"validation pass": [60_000.0, 90_000.0, 50_000.0], "eval.py": [40_000.0]},
        "freed memory kept": {"validation pass": [90_000.0, 91_000.0, 89_000.0], "eval.py": [38_000.0]},
    }
    rows = [line for line in scoring_table(evaluation) if line.startswith("| validation") or line.startswith("| eval")]
    assert rows == [
        "| validation pass | 60,000 (60,000, 90,000, 50,000) | 90,000 (90,000, 91,000, 89,000) | 1.50 |",
        "| eval.py | 40,000 (40,000) | 38,000 (38,000) | 0.95 |",
    ]
