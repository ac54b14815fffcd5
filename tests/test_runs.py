"""Run management as Hydra and Lightning users expect it: a directory per run, users' own config
directories, re-running a saved config, loggers, the progress bar and --help."""

import csv
import shutil
import subprocess
import sys

import pytest
import torch

from nanollm.config import claim_unique_dir
from tests.conftest import ROOT, TINY, assert_user_error, needs_extra, read_results, run_cli, train_args


def test_a_run_directory_is_claimed_once_even_when_its_name_is_taken(tmp_path):
    base = str(tmp_path / "outputs" / "10-00-00")
    assert [claim_unique_dir(base) for _ in range(3)] == [base, f"{base}-1", f"{base}-2"]


def test_two_runs_started_together_get_two_directories_and_both_results_survive(tmp_path):
    # Both claim from the same base name at the same moment, as two runs started in the same second do.
    base = tmp_path / "outputs" / "2026-11-24" / "10-00-00"
    args = [*TINY, f"hydra.run.dir=${{unique_dir:{base}}}", f"data.cache_dir={tmp_path / 'cache'}"]
    processes = [
        subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"seed={seed}"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for seed in (1, 2)
    ]  # fmt: skip
    assert [p.wait(timeout=180) for p in processes] == [0, 0], [p.stderr.read() for p in processes]
    runs = sorted(p for p in base.parent.iterdir())
    assert [p.name for p in runs] == ["10-00-00", "10-00-00-1"]
    assert sorted(read_results(run)["seed"] for run in runs) == [1, 2]
    for run in runs:  # each run's own files, no -v1 copies
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
            "best.ckpt",
            "checkpoint_final.ckpt",
            "checkpoint_step_10.ckpt",
            "last.ckpt",
        ]
        assert len(list((run / "tensorboard").iterdir())) == 1
        # What a run writes after training, just before its process exits (cli.skip_shutdown_collections
        # spares the exit its garbage collections): the final metrics with the hyperparameters, the log's end.
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (events_dir,) = {p.parent for p in (run / "tensorboard").rglob("events.out.tfevents.*")}
        events = EventAccumulator(str(events_dir), size_guidance={"tensors": 0}).Reload()
        assert "hparams/final_val_loss" in events.Tags()["scalars"]
        assert "_hparams_/session_end_info" in events.PluginTagToContent("hparams")
        assert "sample:" in (run / "train.log").read_text()


def test_a_preset_from_the_users_own_config_directory_trains(tmp_path):
    # Written before model.activation existed: the key takes its default.
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "tiny.yaml").write_text(
        "name: tiny\nembedding_dim: 8\nnum_layers: 1\nnum_heads: 2\nffn_hidden_dim: 16\ncontext_length: 16\n"
        "dropout: 0.0\nposition_encoding: rope\nrecommended_lr: 0.003\nrecommended_steps: 6\n"
    )
    base = ["trainer.enable_progress_bar=false", f"data.cache_dir={tmp_path / 'c'}", "sample.max_new_tokens=0"]
    trained = run_cli("train.py", ["--config-dir", str(tmp_path / "my_conf"), "model=tiny", *base,
                                   f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    results = read_results(tmp_path / "run")
    assert results["model"] == "tiny" and results["global_step"] == 6
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["nanollm"]["model"]["activation"] == "gelu"
    # A real typo still gets one line, listing what Hydra finds, the user's directory included.
    typo = run_cli("train.py", ["--config-dir", str(tmp_path / "my_conf"), "model=tinny", *base])
    assert (
        typo.returncode == 1
        and "error: unknown model 'tinny'; choose one of: large, medium, nano, small, tiny" in typo.stderr
    )


def test_a_runs_saved_config_trains_the_same_run_again(trained_run, tmp_path):
    # Resumed (from step 10, as after a crash) by a command line that repeats none of the run's settings:
    # its composed config (.hydra/) holds the defaults, the run trains with its checkpoint's.
    shutil.copytree(trained_run, tmp_path / "run")
    halfway = tmp_path / "run" / "checkpoints" / "checkpoint_step_10.ckpt"
    resumed = run_cli("train.py", [f"hydra.run.dir={tmp_path / 'run'}", f"ckpt_path={halfway}"])
    assert resumed.returncode == 0, resumed.stderr
    # Trained again as a new run: its own directory under outputs_dir, as Hydra's run settings make it.
    outputs = tmp_path / "outputs"
    again = run_cli("train.py", ["--config-dir", str(tmp_path / "run"), "--config-name", "run_config",
                                 f"outputs_dir={outputs}"])  # fmt: skip
    assert again.returncode == 0, again.stderr
    (new_run,) = outputs.glob("*/*")
    assert (new_run / "train.log").is_file() and "run directory" in again.stdout and "[INFO]" not in again.stdout
    first, second = read_results(tmp_path / "run"), read_results(new_run)
    assert second["resumed_from"] is None and second["start_step"] == 0
    for key in ("final_val_loss", "num_parameters", "global_step", "seed"):
        assert second[key] == first[key], key


@needs_extra("mlflow", "mlflow")
@needs_extra("wandb", "wandb")
def test_every_logger_writes_its_files(tmp_path):
    result = run_cli("train.py", train_args(tmp_path, "logger=[tensorboard,csv,mlflow,wandb]"))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    (metrics,) = run.glob("csv/*/metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "hparams/final_val_loss"} <= set(header)
    assert "```\nThe " in (metrics.parent / "samples.md").read_text()  # text samples beside the metrics
    assert list(run.glob("tensorboard/*/events.out.tfevents.*"))
    (mlflow_run,) = [p for p in run.glob("mlruns/*/*") if (p / "metrics").is_dir()]
    assert (mlflow_run / "metrics" / "val" / "loss").exists() and (mlflow_run / "params" / "optim.lr").exists()
    assert list(mlflow_run.glob("artifacts/samples/step_*.txt"))
    assert list(run.glob("wandb/offline-run-*/run-*.wandb"))


def test_a_missing_tracker_extra_is_named_in_one_line(tmp_path, monkeypatch):
    import lightning.pytorch.loggers.mlflow as mlflow_logger

    monkeypatch.setattr(mlflow_logger, "_MLFLOW_AVAILABLE", False)
    result = run_cli("train.py", train_args(tmp_path, "logger=mlflow"))
    assert result.returncode == 1 and result.stderr.strip() == (
        "error: logger=mlflow needs the optional 'mlflow' extra: pip install -e '.[mlflow]' (or use logger=csv)."
    )


def test_the_progress_bar_counts_steps_without_epochs_or_versions(tmp_path):
    result = run_cli("train.py", train_args(tmp_path, "trainer.enable_progress_bar=true", "trainer.max_steps=10"))
    assert result.returncode == 0, result.stderr
    bar = result.stdout + result.stderr
    assert "Training: 100%" in bar and "10/10" in bar and "loss=" in bar
    assert "Epoch" not in bar and "v_num" not in bar


@pytest.mark.parametrize("script", ["train.py", "generate.py", "eval.py"])
def test_help_says_what_the_command_does(script):
    result = run_cli(script, ["--help"])
    assert result.returncode == 0 and result.stdout.startswith(f"nanollm {script}:")
    if script == "train.py":
        assert "model=small" in result.stdout and "ckpt_path=last" in result.stdout and "README.md" in result.stdout


def test_tokens_per_second_leaves_out_validation_time(tmp_path):
    # Every validation batch takes 0.3 s longer: the interval that holds a validation must not look slower.
    slow = ["+callbacks.slow._target_=tests.faults.SlowValidation", "+callbacks.slow.seconds=0.3"]
    args = ["logger=csv", "trainer.max_steps=30", "trainer.val_check_interval=10", "data.val_windows=null", *slow]
    result = run_cli("train.py", train_args(tmp_path, *args))
    assert result.returncode == 0, result.stderr
    (metrics,) = (tmp_path / "run").glob("csv/*/metrics.csv")
    with open(metrics, newline="") as handle:
        rates = {
            int(r["step"]): float(r["train/tokens_per_second"])
            for r in csv.DictReader(handle)
            if r["train/tokens_per_second"]
        }
    # The intervals ending at steps 15 and 25 each hold a validation (steps 10 and 20) that takes 10-20 times
    # as long as their 5 training steps: counted as training time, it would cut their rate by that much. The
    # bound leaves room for a loaded machine (intervals this short vary by 2x under load).
    assert min(rates[15], rates[25]) > 0.25 * min(rates[20], rates[30]), rates


def test_a_directory_in_use_by_a_live_run_is_refused_until_that_run_ends(tmp_path):
    # Another run holds the directory before it has saved anything: no checkpoint tells that it is there.
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from nanollm.locking import claim_directory; "
         "claim_directory(sys.argv[1]); print('held', flush=True); sys.stdin.read()", str(checkpoints)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        refused = run_cli("train.py", train_args(tmp_path))
        assert_user_error(refused, str(checkpoints), "in use by another run", "hydra.run.dir")
        assert not list(checkpoints.iterdir()) and not (tmp_path / "run" / "results.json").exists()
    finally:
        holder.communicate("")  # that run ends: the kernel drops its lock with its process
    assert run_cli("train.py", train_args(tmp_path)).returncode == 0


def test_a_sweep_run_again_or_resumed_keeps_every_jobs_own_run(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "seed=1,2", f"hydra.sweep.dir={sweep}", f"data.cache_dir={tmp_path / 'c'}",
            f"outputs_dir={tmp_path / 'outputs'}"]  # fmt: skip
    assert run_cli("train.py", args).returncode == 0
    first_job = {p: p.read_bytes() for p in (sweep / "0").rglob("*") if p.is_file() and p.suffix in (".json", ".ckpt")}
    shutil.rmtree(sweep / "1")  # a job the interrupted sweep never reached

    # Resumed as an interrupted sweep says: the finished job has nothing left to train and keeps its files;
    # the job that never ran starts from the beginning, not from the other job's checkpoint.
    resumed = run_cli("train.py", [*args, "ckpt_path=last"])
    assert "nothing left to train" in resumed.stderr
    second = read_results(sweep / "1")
    assert (second["status"], second["seed"], second["resumed_from"]) == ("completed", 2, None)

    # Run again as it was: both jobs are refused their directories, and their results stay.
    second_job = (sweep / "1" / "results.json").read_bytes()
    again = run_cli("train.py", args)
    assert again.stderr.count("already holds checkpoints of another run") == 2
    assert {p: p.read_bytes() for p in first_job} == first_job
    assert (sweep / "1" / "results.json").read_bytes() == second_job


def test_a_run_refused_at_start_leaves_no_run_directory(tmp_path):
    outputs = tmp_path / "outputs"
    args = [*TINY, f"outputs_dir={outputs}", f"data.path={tmp_path / 'missing.txt'}"]
    assert_user_error(run_cli("train.py", args), "missing.txt", "does not exist")
    assert not list(outputs.rglob("*"))  # the directory claimed for the run is gone, and its empty outputs/<date>/


def test_a_resumed_run_logs_on_as_the_same_run_with_its_precision(tmp_path):
    first = run_cli("train.py", train_args(tmp_path, "logger=many", "trainer.precision=bf16-mixed"))
    assert first.returncode == 0, first.stderr
    finished = torch.load(tmp_path / "run/checkpoints/checkpoint_final.ckpt", weights_only=True)["state_dict"]
    # Trained longer without restating its precision, and its loggers named another way: the run name built
    # from these overrides differs, the run does not.
    more = ["logger=[tensorboard,csv]", "ckpt_path=last", "trainer.max_steps=30"]
    resumed = run_cli("train.py", train_args(tmp_path, *more))
    assert resumed.returncode == 0, resumed.stderr
    run = tmp_path / "run"
    names = {p.name for p in (run / "tensorboard").iterdir()}
    assert len(names) == 1 and names == {p.name for p in (run / "csv").iterdir()}
    (metrics,) = (run / "csv").glob("*/metrics.csv")
    with open(metrics, newline="") as handle:
        logged = sorted({int(r["step"]) for r in csv.DictReader(handle) if r.get("train/loss")})
    assert logged == [5, 10, 15, 20, 25, 30]  # the rows from before the resume are kept
    results = read_results(run)
    assert results["precision"] == "bf16-mixed" and results["resumed_with_changes"] == ["trainer.max_steps: 20 -> 30"]
    assert "precision: bf16-mixed" in (run / "run_config.yaml").read_text()
    # The model the finished run ended with is kept under its step: checkpoint_final is the new end's now.
    kept = torch.load(run / "checkpoints/checkpoint_step_20.ckpt", weights_only=True)
    assert kept["global_step"] == 20 and all(torch.equal(kept["state_dict"][k], v) for k, v in finished.items())
    assert torch.load(run / "checkpoints/checkpoint_final.ckpt", weights_only=True)["global_step"] == 30
