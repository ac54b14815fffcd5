"""Sweep reports: `python -m nanollm.report SWEEP_DIR` (also run when a Hydra multirun ends).

Writes into the sweep directory: summary.json, summary.csv and summary.md (one row per run),
loss_vs_parameters.png (log-log, with a fitted power law), val_loss_curves.png and
loss_vs_time.png; loss_curves.png when the runs logged to CSV (logger=csv or many); for the named
scaling experiments also the runbook's `<experiment>.json`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from nanollm.errors import NanoLLMError
from nanollm.files import atomic_write_text

RUNBOOK_EXPERIMENTS = ("capacity_scaling", "context_scaling", "depth_scaling", "width_scaling")
COLUMNS = (
    "job",
    "status",
    "label",
    "overrides",
    "num_parameters",
    "global_step",
    "training_time_seconds",
    "tokens_per_second",
    "final_train_loss",
    "final_val_loss",
    "final_val_perplexity",
    "best_val_loss",
    "error",
)


def collect_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Each job directory's results.json, in job order."""
    runs = []
    for path in sweep_dir.glob("*/results.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            record = err
        if not isinstance(record, dict):  # cut short, or not written by nanollm: named, and left out
            print(f"warning: skipping {path}: not a results record ({record}).", file=sys.stderr)
            continue
        record.setdefault("status", "unknown")
        record["job"] = path.parent.name
        runs.append(record)
    # Label each run by what sets it apart: the overrides not shared by every run of the sweep.
    shared = set.intersection(*(set(r.get("overrides") or []) for r in runs)) if runs else set()
    for r in runs:
        r["label"] = ",".join(o for o in r.get("overrides") or [] if o not in shared) or f"job {r['job']}"
        r["overrides"] = ",".join(r.get("overrides") or [])
    return sorted(runs, key=lambda r: (not r["job"].isdigit(), int(r["job"]) if r["job"].isdigit() else r["job"]))


def fit_power_law(runs: list[dict]) -> dict | None:
    """Least-squares fit of log(loss) = log(a) + b log(N) over completed runs with distinct sizes."""
    import numpy as np

    points = [(r["num_parameters"], r["final_val_loss"]) for r in completed(runs)]
    if len({n for n, _ in points}) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    exponent, intercept = np.polyfit(x, y, 1)
    return {"coefficient": float(math.exp(intercept)), "exponent": float(exponent)}


def completed(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r.get("status") == "completed" and r.get("final_val_loss") is not None]


def write_report(sweep_dir: str | Path, runs: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Write the summary files and plots of `runs` (collect_runs' if not given); returns what was written."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        problem = "is not a directory" if sweep_dir.exists() else "does not exist"
        raise NanoLLMError(f"Sweep directory '{sweep_dir}' {problem}; pass outputs/multirun/<date>/<time>.")
    runs = collect_runs(sweep_dir) if runs is None else runs
    if not runs:
        raise NanoLLMError(
            f"No results.json under '{sweep_dir}/*/': is this a sweep directory (outputs/multirun/<date>/<time>)?"
        )
    fit = fit_power_law(runs)
    written = {
        "summary.json": _write_json(sweep_dir / "summary.json", {"runs": [_row(r) for r in runs], "power_law": fit}),
        "summary.csv": _write_csv(sweep_dir / "summary.csv", runs),
        "summary.md": _write_markdown(sweep_dir / "summary.md", runs, fit),
    }
    written.update(_plots(sweep_dir, runs, fit))
    for name in sorted({r.get("experiment_name") for r in runs} & set(RUNBOOK_EXPERIMENTS)):
        entries = [
            {
                "experiment_name": name,
                "run": r["label"],
                "num_parameters": r["num_parameters"],
                "training_time_seconds": r["training_time_seconds"],
                "results": {"final_val_loss": r["final_val_loss"], "final_val_perplexity": r["final_val_perplexity"]},
            }
            for r in completed(runs)
            if r.get("experiment_name") == name
        ]
        written[f"{name}.json"] = _write_json(sweep_dir / f"{name}.json", entries)
    return written


def _row(run: dict) -> dict:
    return {key: run.get(key) for key in COLUMNS}


def _write_json(path: Path, data) -> Path:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n", what="report")
    return path


def _write_csv(path: Path, runs: list[dict]) -> Path:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(_row(r) for r in runs)
    atomic_write_text(path, buffer.getvalue(), what="report")
    return path


def _write_markdown(path: Path, runs: list[dict], fit: dict | None) -> Path:
    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    lines = [
        "| job | status | run | parameters | steps | time (s) | tokens/s | train loss | val loss | val perplexity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['job']} | {r['status']} | {r['label']} | {fmt(r.get('num_parameters'), ',')} | "
            f"{fmt(r.get('global_step'), 'd')} | {fmt(r.get('training_time_seconds'), '.1f')} | "
            f"{fmt(r.get('tokens_per_second'), ',.0f')} | {fmt(r.get('final_train_loss'), '.4f')} | "
            f"{fmt(r.get('final_val_loss'), '.4f')} | {fmt(r.get('final_val_perplexity'), '.2f')} |"
        )
    for r in runs:
        if r["status"] == "failed":
            lines.append(f"\nJob {r['job']} ({r['label']}) failed: {r.get('error')}")
    if fit:
        lines.append(
            f"\nPower-law fit: val loss = {fit['coefficient']:.3f} x N^{fit['exponent']:.4f} (N = parameters)."
        )
    atomic_write_text(path, "\n".join(lines) + "\n", what="report")
    return path


def _plots(sweep_dir: Path, runs: list[dict], fit: dict | None) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    done = completed(runs)
    written = {}

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([r["num_parameters"] for r in done], [r["final_val_loss"] for r in done], zorder=3)
    for r in done:
        ax.annotate(r["label"], (r["num_parameters"], r["final_val_loss"]), fontsize=7, alpha=0.8)
    if fit:
        sizes = np.geomspace(min(r["num_parameters"] for r in done), max(r["num_parameters"] for r in done), 50)
        ax.plot(
            sizes, fit["coefficient"] * sizes ** fit["exponent"], "--", label=f"fit: loss ∝ N^{fit['exponent']:.3f}"
        )
        ax.legend()
    if done:  # a log axis needs positive values
        ax.set(xscale="log", yscale="log")
    ax.set(xlabel="parameters", ylabel="final validation loss", title="Loss vs model size")
    written["loss_vs_parameters.png"] = _save(fig, sweep_dir / "loss_vs_parameters.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in done:
        history = r.get("val_history") or []
        ax.plot([h["step"] for h in history], [h["val_loss"] for h in history], marker="o", ms=3, label=r["label"])
    ax.set(xlabel="step", ylabel="validation loss", title="Validation loss during training")
    if done:
        ax.legend(fontsize=7)
    written["val_loss_curves.png"] = _save(fig, sweep_dir / "val_loss_curves.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([r["training_time_seconds"] for r in done], [r["final_val_loss"] for r in done], zorder=3)
    for r in done:
        ax.annotate(r["label"], (r["training_time_seconds"], r["final_val_loss"]), fontsize=7, alpha=0.8)
    ax.set(xlabel="training time (s)", ylabel="final validation loss", title="Loss vs training time")
    written["loss_vs_time.png"] = _save(fig, sweep_dir / "loss_vs_time.png")

    # The runs' CSV logs (logger=csv or logger=many): full training curves without TensorBoard.
    curves = {r["label"]: read_metrics_csv(sweep_dir / r["job"]) for r in done}
    curves = {label: rows for label, rows in curves.items() if rows}
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for index, (label, rows) in enumerate(curves.items()):
            color = f"C{index % 10}"
            for key, style in (("train/loss", "-"), ("val/loss", "--o")):
                points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), style, ms=3, color=color, label=f"{label} ({key})")
        ax.set(xlabel="step", ylabel="loss", title="Training (solid) and validation (dashed) loss, from metrics.csv")
        ax.legend(fontsize=6)
        written["loss_curves.png"] = _save(fig, sweep_dir / "loss_curves.png")
    return written


def read_metrics_csv(job_dir: Path) -> list[dict]:
    """The rows of a job's Lightning CSVLogger file (`csv/<run name>/metrics.csv`), numbers parsed."""
    files = sorted(job_dir.glob("csv/*/metrics.csv"))
    if not files:
        return []
    with open(files[0], newline="") as handle:
        return [
            {key: float(value) for key, value in row.items() if value not in ("", None)}
            for row in csv.DictReader(handle)
        ]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class SweepReport(Callback):
    """Hydra callback: writes the report into the sweep directory when a multirun ends, and makes the
    sweep exit with status 1 when any of its runs failed (a failed run does not stop the others)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = collect_runs(sweep_dir)  # once: the report and the exit status read the same records
        try:
            written = write_report(sweep_dir, runs)
        except NanoLLMError as err:
            print(f"error: sweep report not written: {err}", file=sys.stderr)
            return
        print(f"Sweep report: {written['summary.md']} (+ {len(written) - 1} more files in {sweep_dir})")
        failed = [run["label"] for run in runs if run.get("status") == "failed"]
        if failed:
            print(
                f"error: {len(failed)} of {len(runs)} runs of this sweep failed ({'; '.join(failed)}): each one's "
                f"error is above and in {written['summary.md']}; fix it and run those again.",
                file=sys.stderr,
            )
            # SystemExit is not an Exception, so it passes Hydra's guard around callbacks: scripts and
            # CI that run a sweep see from its exit status that something failed.
            sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(
            "usage: python -m nanollm.report SWEEP_DIR   (e.g. outputs/multirun/2026-11-24/10-00-00)", file=sys.stderr
        )
        sys.exit(2)
    try:
        written = write_report(args[0])
    except NanoLLMError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print((Path(args[0]) / "summary.md").read_text())
    print("Wrote: " + ", ".join(written))


if __name__ == "__main__":
    main()
