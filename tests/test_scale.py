"""Beyond one CPU process: DDP for real on CPU, GPU/compile settings, cluster launchers, Optuna."""

import json

import pytest
import torch

from nanollm.api import compose_config
from tests.conftest import ROOT, read_results, run_script, train_args

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def test_ddp_on_cpu_with_two_processes_trains_checkpoints_from_rank_0_and_resumes(tmp_path):
    result = run_script("train.py", train_args(tmp_path, *DDP), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in result.stdout + result.stderr  # really two processes
    assert result.stdout.count("final val loss") == 1  # one report, from rank 0
    results = read_results(tmp_path / "run")
    assert results["global_step"] == 20 and results["final_val_loss"] < 4.0
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 20
    # Each of the 2 processes draws half of the global batch of 8.
    assert json.loads((tmp_path / "run" / "results.json").read_text())["tokens_seen"] == 20 * 8 * 32

    resumed = run_script(
        "train.py", [*train_args(tmp_path, *DDP, "trainer.max_steps=30"), "ckpt_path=last"], timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert read_results(tmp_path / "run")["global_step"] == 30


def test_gpu_precision_and_compile_flags_compose_and_run_on_cpu(tmp_path):
    # The GPU preset's precision on the CPU (bf16 autocast exists there too), compiled with torch.compile.
    cfg = compose_config(["trainer=gpu"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    args = train_args(
        tmp_path, "trainer.precision=bf16-mixed", "compile=true", "trainer.max_steps=4", "trainer.val_check_interval=4"
    )
    result = run_script("train.py", args, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "precision bf16-mixed" in result.stdout
    results = read_results(tmp_path / "run")
    assert results["precision"] == "bf16-mixed" and results["final_val_loss"] < 4.2
    # Compiled in place: the checkpoint keys are those of the plain model, so generation loads it.
    generated = run_script(
        "generate.py", [f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", "max_new_tokens=5"]
    )
    assert generated.returncode == 0, generated.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_trainer_runs(tmp_path):
    result = run_script("train.py", train_args(tmp_path, "trainer=gpu", "compile=true"), timeout=600)
    assert result.returncode == 0, result.stderr


def test_fsdp_and_slurm_launcher_configs_compose():
    from hydra import compose, initialize_config_dir

    assert compose_config(["trainer=fsdp"]).trainer.strategy == "fsdp"
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        for launcher in ("slurm", "submitit_slurm"):
            cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
            assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
        assert cfg.hydra.launcher.submitit_folder.endswith(".submitit/%j")


def test_optuna_search_minimises_the_validation_loss(tmp_path):
    args = [
        "-m",
        "hparams_search=lr_optuna",
        "hydra.sweeper.n_trials=2",
        *train_args(tmp_path)[:-3],
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=10",
    ]
    result = run_script("train.py", args, timeout=300)
    assert result.returncode == 0, result.stderr
    best = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "optim.lr" in best and "model.dropout" in best and "best_value" in best
    losses = [json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text())["final_val_loss"] for i in (0, 1)]
    assert f"best_value: {min(losses)}" in best
