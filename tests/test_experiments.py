"""Sweeps: Hydra multirun, per-run results, the sweep report and what TensorBoard shows."""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from nanollm.api import compose_config
from tests.conftest import LOGGED_SCALARS, ROOT, SAMPLE, TINY, run_cli

SWEEP_TINY = [o for o in TINY if not o.startswith("model.context_length")] + [
    "trainer.max_steps=10",
    "sample.max_new_tokens=10",
]


@pytest.fixture(scope="module")
def context_sweep(tmp_path_factory):
    """A real multirun of the context_scaling experiment with a tiny model and few steps."""
    tmp = tmp_path_factory.mktemp("sweep")
    args = [
        "experiment=context_scaling",  # sweeps without -m: the experiment sets hydra.mode=MULTIRUN
        *SWEEP_TINY,
        f"hydra.sweep.dir={tmp / 'sweep'}",
        f"data.cache_dir={tmp / 'cache'}",
    ]
    result = run_cli("train.py", args)
    assert result.returncode == 0, result.stderr
    return tmp / "sweep"


def test_experiment_sweep_writes_runs_results_report_and_plots(context_sweep):
    jobs = sorted(p for p in context_sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    contexts = []
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        assert results["status"] == "completed" and results["experiment_name"] == "context_scaling"
        for key in ("tokens_seen", "best_val_loss", "tokens_per_second", "device", "precision", "val_history"):
            assert results[key] is not None, key
        contexts.append(results["config"]["model"]["context_length"])
        assert any(o.startswith("model.context_length=") for o in results["overrides"])
    assert contexts == [32, 64, 128, 256]
    for name in (
        "summary.json",
        "summary.csv",
        "summary.md",
        "loss_vs_parameters.png",
        "val_loss_curves.png",
        "loss_vs_time.png",
    ):
        assert (context_sweep / name).stat().st_size > 0, name
    assert (context_sweep / "loss_vs_parameters.png").read_bytes()[:4] == b"\x89PNG"
    runbook = json.loads((context_sweep / "context_scaling.json").read_text())
    assert len(runbook) == 4
    for entry in runbook:
        assert entry["experiment_name"] == "context_scaling"
        assert entry["num_parameters"] > 0 and entry["training_time_seconds"] > 0
        assert entry["results"]["final_val_loss"] > 0 and entry["results"]["final_val_perplexity"] > 1
    summary = json.loads((context_sweep / "summary.json").read_text())
    assert summary["power_law"] is None  # RoPE: every context length has the same parameters, nothing to fit
    assert "model.context_length=256" in (context_sweep / "summary.md").read_text()


def test_tensorboard_events_hold_scalars_text_samples_and_hparams(context_sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted((context_sweep / "0" / "tensorboard").iterdir())
    assert len(runs) == 1 and "model.context_length=32" in runs[0].name  # named from the overrides
    events = EventAccumulator(str(runs[0]), size_guidance={"tensors": 0}).Reload()
    assert LOGGED_SCALARS <= set(events.Tags()["scalars"])
    assert "samples/text/text_summary" in events.Tags()["tensors"]
    sample = events.Tensors("samples/text/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert sample.startswith("```\nThe ")
    assert set(events.PluginTagToContent("hparams")) >= {"_hparams_/experiment", "_hparams_/session_start_info"}
    assert "hparams/final_val_loss" in events.Tags()["scalars"]


def test_power_law_fit_recovers_a_known_law_and_needs_two_sizes():
    from nanollm.report import fit_power_law

    runs = [{"status": "completed", "num_parameters": n, "final_val_loss": 3.0 * n**-0.1} for n in (1e4, 1e5, 1e6)]
    fit = fit_power_law([*runs, {"status": "failed", "num_parameters": 10, "final_val_loss": None}])
    assert abs(fit["coefficient"] - 3.0) < 1e-6 and abs(fit["exponent"] + 0.1) < 1e-9
    assert fit_power_law([runs[0], {**runs[0], "final_val_loss": 2.0}]) is None


def test_a_failing_run_is_reported_and_does_not_stop_the_sweep(tmp_path):
    args = [
        "-m",
        *TINY,
        "model.num_heads=2,3",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    result = run_cli("train.py", args)
    # The sweep goes on past the failed run, then exits 1 and names it last.
    assert result.returncode == 1, result.stderr
    assert "error: model.embedding_dim (16) must be divisible by model.num_heads (3)" in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1].startswith("error: 1 of 2 runs of this sweep failed (model.num_heads=3)")
    )
    assert "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert [(r["label"], r["status"]) for r in summary["runs"]] == [
        ("model.num_heads=2", "completed"),
        ("model.num_heads=3", "failed"),
    ]
    assert "Job 1 (model.num_heads=3) failed" in (tmp_path / "sweep" / "summary.md").read_text()


def test_a_jobs_unreadable_results_are_named_and_left_out_of_the_report(trained_run, tmp_path):
    # A truncated results.json or a foreign one stopped the report with a traceback, half written.
    sweep = tmp_path / "sweep"
    for job in "012":
        (sweep / job).mkdir(parents=True)
    good = (trained_run / "results.json").read_text()
    (sweep / "0" / "results.json").write_text(good)
    (sweep / "1" / "results.json").write_text(good[:100])
    (sweep / "2" / "results.json").write_text("[1, 2]")
    result = subprocess.run(
        [sys.executable, "-m", "nanollm.report", str(sweep)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert f"skipping {sweep / '1' / 'results.json'}" in result.stderr and f"{sweep / '2'}" in result.stderr
    summary = json.loads((sweep / "summary.json").read_text())
    assert [r["job"] for r in summary["runs"]] == ["0"] and (sweep / "summary.md").exists()


def test_report_command_rewrites_the_report_and_rejects_a_non_sweep(context_sweep, tmp_path):
    (context_sweep / "summary.md").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "nanollm.report", str(context_sweep)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0 and (context_sweep / "summary.md").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "nanollm.report", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error: No results.json") and "Traceback" not in bad.stderr


def test_report_command_names_a_file_as_not_a_sweep_directory(capsys):
    from nanollm.report import main

    with pytest.raises(SystemExit) as exit_:
        main([str(SAMPLE)])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == (
        f"error: Sweep directory '{SAMPLE}' is not a directory; pass outputs/multirun/<date>/<time>.\n"
    )


@pytest.mark.parametrize(
    "name, key, values",
    [
        ("capacity_scaling", "model", "nano,small,medium"),
        ("depth_scaling", "model.num_layers", "1,2,4,6"),
        ("width_scaling", "model.embedding_dim", "32,64,128,256"),
        ("context_scaling", "model.context_length", "32,64,128,256"),
    ],
)
def test_experiment_configs_define_their_sweeps(name, key, values):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
    assert cfg.experiment_name == name and cfg.hydra.sweeper.params[key] == values
    if name == "width_scaling":
        cfg = compose_config(["experiment=width_scaling", "model.embedding_dim=128"])
        assert cfg.model.ffn_hidden_dim == 512  # 4x the width


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_serves_the_sweeps_runs_scalars_and_text(context_sweep):
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(context_sweep),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def get(path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return json.loads(response.read())

    try:
        deadline = time.time() + 60
        while True:
            try:
                runs = get("/data/runs")
                if len(runs) >= 4:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "TensorBoard did not serve the runs"
            time.sleep(0.5)
        assert any("model.context_length=256" in run for run in runs)
        tags = get("/data/plugin/scalars/tags")
        run = next(r for r in runs if "model.context_length=64" in r)
        assert {"train/loss", "val/loss", "val/perplexity"} <= set(tags[run])
        query = urllib.parse.urlencode({"run": run, "tag": "val/loss"})
        points = get(f"/data/plugin/scalars/scalars?{query}")
        assert [p[1] for p in points] == [10]  # (wall time, step, value) at the final validation
        assert "samples/text/text_summary" in get("/data/plugin/text/tags")[run]
        query = urllib.parse.urlencode({"run": run, "tag": "samples/text/text_summary"})
        texts = get(f"/data/plugin/text/text?{query}")
        assert texts[-1]["step"] == 10 and "The " in texts[-1]["text"]
    finally:
        server.terminate()
        server.wait(timeout=30)
