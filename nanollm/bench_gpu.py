"""GPU benchmark: `python -m nanollm.bench_gpu --data path/to/tinyshakespeare.txt [--out FILE]`.

Each configuration runs as `python train.py ...` in a process of its own, timed from launch to exit:
- the time to a target validation loss (default 1.47, nanoGPT's shakespeare_char result): Lightning's
  EarlyStopping ends the run at the first validation below it (`callbacks=early_stopping
  callbacks.early_stopping.stopping_threshold=1.47`), and every validation is a full pass over the
  validation split (`data.val_windows=null`), so the figure counts start-up, compilation, validation
  and the final checkpoint, and the loss it stops on is exact;
- training tokens/s (the median of the logged intervals, which leave validation and checkpoint
  writes out) and the model FLOPs utilisation against the GPU's bf16 peak: its datasheet figure
  (dense) and a bf16 matrix product measured here.

`--run NAME='OVERRIDES'` adds a configuration of your own (repeatable); `--configs` picks the named ones.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanollm.bench import ROOT, SAMPLE, markdown_table

CONFIGS = {
    "large": "model=large trainer=gpu compile=true",
    "shakespeare_char": "experiment=shakespeare_char",
    "shakespeare_char+cudagraphs": "experiment=shakespeare_char compile=reduce-overhead",
}

# Dense bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s (the SXM parts unless named).
DATASHEET_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def datasheet_peak(device_name: str) -> float | None:
    """The datasheet bf16 FLOP/s of a GPU named like torch.cuda.get_device_name(), or None if unknown."""
    for name, tflops in DATASHEET_BF16_TFLOPS.items():  # the most specific names come first
        if name in device_name:
            return tflops * 1e12
    return None


def bf16_matmul_peak(size: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matrix-multiply FLOP/s of this GPU (mean of `repeats` products after warm-up)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1000)


def stop_at_target_command(overrides: list[str], data: Path, run_dir: Path, target: float) -> list[str]:
    """`python train.py` with the overrides, stopped at the first full-pass validation below `target`."""
    return [
        sys.executable,
        "train.py",
        *overrides,
        f"data.path={data}",
        f"hydra.run.dir={run_dir}",
        "data.val_windows=null",  # every validation a full pass: the run stops on the exact loss
        "callbacks=early_stopping",
        f"callbacks.early_stopping.stopping_threshold={target}",
        "callbacks.early_stopping.patience=1000000",  # only the target stops it
        "logger=csv",
        "sample.max_new_tokens=0",
        "trainer.enable_progress_bar=false",
    ]


def interval_rates(run_dir: Path) -> list[float]:
    """The logged training tokens/s of each interval, in order (CSVLogger's metrics.csv)."""
    rates = []
    for path in run_dir.glob("csv/*/metrics.csv"):
        with path.open() as f:
            rates += [
                float(row["train/tokens_per_second"]) for row in csv.DictReader(f) if row["train/tokens_per_second"]
            ]
    return rates


def flops_per_token(results: dict) -> int:
    from omegaconf import OmegaConf

    from nanollm.config import model_config_from
    from nanollm.model import TransformerLanguageModel

    cfg = OmegaConf.create({"model": results["config"]["model"]})
    return TransformerLanguageModel(model_config_from(cfg, results["vocab_size"])).flops_per_token()


def timed_run(name: str, overrides: str, data: Path, work: Path, target: float, timeout: float) -> dict:
    """One train.py process to the target loss (or to its max_steps), with what the report needs."""
    run_dir = work / name
    row = {"name": name, "overrides": overrides}
    started = time.time()
    try:
        done = subprocess.run(
            stop_at_target_command(shlex.split(overrides), data, run_dir, target),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {**row, "error": f"still running after {timeout:.0f} s"}
    row["seconds"] = time.time() - started
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        return {**row, "error": lines[-1]}
    results = json.loads((run_dir / "results.json").read_text())
    history = results["val_history"]
    reached = next((h for h in history if h["val_loss"] < target), None)  # EarlyStopping's test: below
    rates = interval_rates(run_dir)[1:]  # the first interval holds the compilation
    row.update(
        parameters=results["num_parameters"],
        device=results["device"],
        precision=results["precision"],
        steps=results["global_step"],
        first_step_seconds=results["first_step_unix_time"] - started,
        reached_step=reached["step"] if reached else None,
        final_val_loss=results["final_val_loss"],
        best_val_loss=results["best_val_loss"],
        val_history=history,
        tokens_per_second=statistics.median(rates) if rates else None,
        flops_per_token=flops_per_token(results),
    )
    return row


def with_utilisation(row: dict, peaks: dict[str, float | None]) -> dict:
    """The row plus its MFU against each peak (FLOPs per token x tokens/s / peak FLOP/s)."""
    if row.get("tokens_per_second") is None:
        return row
    achieved = row["flops_per_token"] * row["tokens_per_second"]
    return {**row, **{f"mfu_{kind}": achieved / peak for kind, peak in peaks.items() if peak}}


def markdown(report: dict) -> str:
    peaks = report["peaks"]
    lines = [
        f"GPU benchmark, {report['date']}: {report['device']}, {report['software']}.",
        f"`{report['command']}`",
        "",
        "bf16 peak: "
        + (f"datasheet {peaks['datasheet'] / 1e12:.0f} TFLOP/s (dense), " if peaks.get("datasheet") else "")
        + f"a measured 8192x8192 matrix product {peaks['measured'] / 1e12:.0f} TFLOP/s.",
        "",
    ]
    target = report["target"]
    header = (
        "run",
        "parameters",
        "tokens/s",
        "MFU (datasheet / measured)",
        "to first step",
        f"val < {target} at step",
        "whole process",
        "final val",
    )
    rows = []
    for row in report["runs"]:
        if "error" in row:
            rows.append((row["name"], "", "", "", "", row["error"], "", ""))
            continue
        mfu = " / ".join(f"{100 * row[k]:.1f}%" for k in ("mfu_datasheet", "mfu_measured") if k in row) or "-"
        reached = row["reached_step"] if row["reached_step"] is not None else f"not reached ({row['steps']} steps)"
        rate = f"{row['tokens_per_second']:,.0f}" if row["tokens_per_second"] else "-"
        parameters, first_step = f"{row['parameters'] / 1e6:.1f}M", f"{row['first_step_seconds']:.1f} s"
        whole, final = f"{row['seconds']:.1f} s", f"{row['final_val_loss']:.4f}"
        rows.append((row["name"], parameters, rate, mfu, first_step, reached, whole, final))
    lines += markdown_table(header, rows)
    lines += ["", "Overrides: " + "; ".join(f"{r['name']}: `{r['overrides']}`" for r in report["runs"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SAMPLE, help="text to train on (e.g. tinyshakespeare)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="named configurations to run, in order")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=OVERRIDES", help="a run of your own")
    parser.add_argument("--target", type=float, default=1.47, help="validation loss to stop at")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a run is given up")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here (and the figures as .json)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.configs.split(",") if name and name not in CONFIGS]
    if unknown:  # before the GPU check, so a typo is named on any machine
        parser.error(f"unknown --configs {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    if any("=" not in spec for spec in args.run):
        parser.error("--run takes NAME='OVERRIDES', e.g. --run mine='model=large compile=true'")
    if not torch.cuda.is_available():
        sys.exit(
            "error: no CUDA GPU is visible: this benchmark measures the GPU path (python -m nanollm.bench for CPUs)."
        )
    runs = [(name, CONFIGS[name]) for name in args.configs.split(",") if name]
    runs += [tuple(spec.split("=", 1)) for spec in args.run]
    device = torch.cuda.get_device_name()
    peaks = {"datasheet": datasheet_peak(device), "measured": bf16_matmul_peak()}
    report = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "software": f"torch {torch.__version__}, CUDA {torch.version.cuda}",
        "command": "python -m nanollm.bench_gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "target": args.target,
        "peaks": peaks,
        "runs": [],
    }
    data = args.data.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in runs:
            row = timed_run(name, overrides, data, Path(tmp), args.target, args.timeout)
            report["runs"].append(with_utilisation(row, peaks))
            if args.out:  # after every run, so a cut-off invocation keeps what it measured
                args.out.write_text(markdown(report))
                args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
