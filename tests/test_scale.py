"""Beyond one CPU process: DDP for real on CPU, two nodes on one machine, SLURM's requeue signal,
GPU/compile settings, FSDP's configuration, cluster launchers, parallel sweeps and Optuna."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from nanollm.api import compose_config
from nanollm.model import TransformerLanguageModel
from tests.conftest import ROOT, TINY, assert_user_error, needs_extra, read_results, run_cli, run_script, train_args
from tests.test_reliability import assert_same_state, final_state

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batches_of(run_dir) -> dict[int, list[dict]]:
    return {rank: json.loads((run_dir / f"batches_rank{rank}.json").read_text()) for rank in (0, 1)}


def test_ddp_on_cpu_splits_the_batch_checkpoints_from_rank_0_and_resumes(tmp_path):
    record = ["+callbacks.record._target_=tests.faults.RecordBatches", f"+callbacks.record.path={tmp_path}"]
    result = run_script("train.py", train_args(tmp_path, *DDP, *record), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("final val loss") == 1  # one report, from rank 0
    # What each of the two processes really trained on: half of the global batch of 8, different windows.
    seen = batches_of(tmp_path)
    assert [len(seen[0]), len(seen[1])] == [20, 20]
    assert all(b["shape"] == [4, 32] for rank in (0, 1) for b in seen[rank])
    assert all(a["ids"] != b["ids"] for a, b in zip(seen[0], seen[1], strict=True))
    results = read_results(tmp_path / "run")
    assert results["tokens_seen"] == sum(b["shape"][0] * b["shape"][1] for rank in (0, 1) for b in seen[rank])
    assert results["global_step"] == 20 and results["final_val_loss"] < 3.7
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20

    resumed = run_script("train.py", [*train_args(tmp_path, *DDP, *record, "trainer.max_steps=30"), "ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and read_results(tmp_path / "run")["global_step"] == 30
    assert [len(batches) for batches in batches_of(tmp_path).values()] == [10, 10]  # only the new steps


def test_a_ddp_error_is_printed_once(tmp_path):
    # Each process draws batch_size / 2 windows: 7 does not divide. Both processes fail; one line is printed.
    result = run_script("train.py", train_args(tmp_path, *DDP, "data.batch_size=7"), timeout=300)
    assert_user_error(result, "data.batch_size (7) must be divisible by the number of processes (2)")


def run_two_nodes(tmp_path, node_args: list[list[str]], name: str) -> list[subprocess.CompletedProcess]:
    """`python train.py` once per node, as a scheduler would start them, on this machine."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    nodes = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2"]
    processes, logs = [], []
    for rank, args in enumerate(node_args):
        out, err = (open(tmp_path / f"{name}-node{rank}.{kind}", "w+") for kind in ("out", "err"))
        logs.append((out, err))
        command = [sys.executable, str(ROOT / "train.py"), *TINY, *nodes, f"data.cache_dir={tmp_path / 'cache'}", *args]
        processes.append(
            subprocess.Popen(command, cwd=ROOT, env={**env, "NODE_RANK": str(rank)}, stdout=out, stderr=err)
        )
    results = []
    for process, (out, err) in zip(processes, logs, strict=True):
        try:
            code = process.wait(timeout=240)
        except subprocess.TimeoutExpired:  # a deadlock: fail, and leave no process behind
            for p in processes:
                p.kill()
            raise
        out.seek(0), err.seek(0)
        results.append(subprocess.CompletedProcess(process.args, code, out.read(), err.read()))
    return results


def test_two_nodes_train_in_one_shared_directory_and_resume_from_their_own_directories(tmp_path):
    # First both nodes are given one shared run directory. Then each node's Hydra computes a directory
    # of its own, as when nodes start in different seconds: rank 0's wins, the other node's unused one is
    # removed, and rank 0 alone resolves ckpt_path=last (the newest run): the other node receives its choice.
    shared = f"hydra.run.dir={tmp_path / 'run'}"
    trained = run_two_nodes(tmp_path, [[shared, "trainer.max_steps=10"]] * 2, "train")
    assert [r.returncode for r in trained] == [0, 0], trained[1].stderr
    assert read_results(tmp_path / "run")["global_step"] == 10

    own = [[f"hydra.run.dir={tmp_path / 'resumed' / f'node{rank}'}", f"outputs_dir={tmp_path}"] for rank in (0, 1)]
    resumed = run_two_nodes(tmp_path, [[*a, "trainer.max_steps=15", "ckpt_path=last"] for a in own], "resume")
    assert [r.returncode for r in resumed] == [0, 0], resumed[1].stderr
    results = read_results(tmp_path / "resumed" / "node0")
    assert results["global_step"] == 15 and results["start_step"] == 10
    assert results["resumed_from"] == str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert not (tmp_path / "resumed" / "node1").exists()  # its unused directory is gone


def test_slurm_auto_requeue_saves_requeues_and_the_requeued_job_continues(tmp_path):
    # Lightning's SLURM environment, with a fake `scontrol` that records the requeue and then sends
    # SIGTERM, as SLURM does when it requeues a running job.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\nkill -TERM $PPID\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "nanollm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
    slurm.update(SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost", SCONTROL_LOG=str(tmp_path / "log"))
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", **slurm}
    signal_usr1 = ["+callbacks.fault._target_=tests.faults.SignalAt", "+callbacks.fault.batch=12"]
    args = train_args(tmp_path, "trainer.max_steps=30", "checkpoint_interval=100")
    stopped = run_script(
        "train.py", [*args, *signal_usr1, f"+callbacks.fault.signum={int(signal.SIGUSR1)}"], env_extra=env
    )
    assert stopped.returncode == 143, stopped.stderr
    assert (tmp_path / "log").read_text().split() == ["requeue", "4242"]
    assert (tmp_path / "run" / "hpc_ckpt_1.ckpt").exists()  # Lightning's own save on SIGUSR1
    # The requeued job runs the same command again, in the same directory: it continues the run.
    requeued = run_script("train.py", args, env_extra={**env, "SLURM_RESTART_COUNT": "1"})
    assert requeued.returncode == 0, requeued.stderr
    results = read_results(tmp_path / "run")
    assert results["global_step"] == 30 and results["start_step"] >= 12


def test_a_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    # compile=reduce-overhead (CUDA graphs) through train.py: the model is compiled once, in that mode.
    modes = []
    monkeypatch.setattr(TransformerLanguageModel, "compile", lambda model, **kwargs: modes.append(kwargs))
    result = run_cli("train.py", train_args(tmp_path, "compile=reduce-overhead", "trainer.max_steps=2"))
    assert result.returncode == 0, result.stderr
    assert modes == [{"mode": "reduce-overhead"}]


def test_gpu_precision_and_compile_flags_run_on_cpu_resume_exactly_and_their_checkpoints_load(tmp_path):
    # The GPU preset's precision on the CPU (bf16 autocast exists there too), compiled with torch.compile.
    cfg = compose_config(["trainer=gpu"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    args = ["trainer.precision=bf16-mixed", "compile=true", "trainer.max_steps=30", "trainer.val_check_interval=30"]
    args += ["optim.lr=0.01", "data.val_batch_size=8", "checkpoint_interval=15"]
    result = run_cli("train.py", train_args(tmp_path, *args))
    assert result.returncode == 0, result.stderr
    assert "precision bf16-mixed" in result.stdout
    results = read_results(tmp_path / "run")
    assert results["precision"] == "bf16-mixed" and results["final_val_loss"] < 3.6  # untrained: ln(57) = 4.04
    # Resumed from its step-15 checkpoint (in a new directory), the run ends with the same state. In a new
    # process, as users resume: a second compiled run in one process reuses the first one's compiled code,
    # and its weights differ in the last bits even without a resume (measured).
    halfway = tmp_path / "run" / "checkpoints" / "checkpoint_step_15.ckpt"
    resumed = run_script("train.py", train_args(tmp_path, *args, f"ckpt_path={halfway}", run="resumed"))
    assert resumed.returncode == 0, resumed.stderr
    assert read_results(tmp_path / "resumed")["start_step"] == 15
    assert_same_state(final_state(tmp_path / "run"), final_state(tmp_path / "resumed"))
    assert read_results(tmp_path / "resumed")["final_val_loss"] == results["final_val_loss"]
    # Compiled in place: the checkpoint keys are those of the plain model, so generation and eval load it.
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert run_cli("generate.py", [f"ckpt_path={checkpoint}", "max_new_tokens=5"]).returncode == 0
    scored = run_cli("eval.py", [f"ckpt_path={checkpoint}", f"output={tmp_path / 'eval.json'}"])
    assert scored.returncode == 0, scored.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["loss"] < 3.6


def test_more_gpus_than_the_machine_has_is_one_line(tmp_path, monkeypatch):
    # A machine with one GPU, as the config check sees it; the run stops before Lightning touches CUDA.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = run_cli("train.py", train_args(tmp_path, "trainer.accelerator=gpu", "trainer.devices=4"))
    assert_user_error(result, "trainer.devices=4", "only 1 CUDA GPU", "trainer.devices=1")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_trainer_runs(tmp_path):
    result = run_script("train.py", train_args(tmp_path, "trainer=gpu", "compile=true"), timeout=600)
    assert result.returncode == 0, result.stderr
    assert read_results(tmp_path / "run")["final_val_loss"] < 3.7


def test_fsdp_config_is_one_lightning_accepts_and_clips_over_every_shard():
    cfg = compose_config(["trainer=fsdp"])
    assert cfg.trainer.strategy == "fsdp" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.get("gradient_clip_algorithm") in (None, "norm")
    # Lightning refuses norm clipping for FSDP's precision plugin; the module routes it to FSDP's own.
    from lightning.pytorch.strategies import FSDPStrategy

    from nanollm.module import LanguageModelModule

    calls = []

    class ShardedRoot:  # what trainer.model is under FSDP: the wrapped model, with a collective clip_grad_norm_
        def clip_grad_norm_(self, max_norm):
            calls.append(max_norm)
            return torch.tensor(2.5)

    class Trainer:
        strategy = FSDPStrategy.__new__(FSDPStrategy)
        model = ShardedRoot()

    module = LanguageModelModule(model_config={"vocab_size": 5, "embedding_dim": 8, "num_heads": 2}, optim={})
    module._trainer = Trainer()
    module.configure_gradient_clipping(None, gradient_clip_val=1.0)
    assert module._gradient_norm() == 2.5 and calls == [1.0, float("inf")]


@needs_extra("hydra_plugins.hydra_submitit_launcher", "sweeps")
def test_slurm_launcher_configs_compose(tmp_path):
    from hydra import compose, initialize_config_dir

    # Reading submitit_folder resolves hydra.sweep.dir, which claims (creates) it: under tmp_path, not outputs/.
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        for launcher in ("slurm", "submitit_slurm"):
            overrides = [f"hydra/launcher={launcher}", f"outputs_dir={tmp_path}"]
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
            assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
        assert cfg.hydra.launcher.submitit_folder.endswith(".submitit/%j")


@needs_extra("hydra_plugins.hydra_joblib_launcher", "sweeps")
def test_a_joblib_sweep_runs_its_jobs_in_parallel_each_on_its_share_of_the_cores(tmp_path):
    args = [
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=1,2",
        *TINY,
        "trainer.max_steps=150",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    result = run_script("train.py", args, timeout=300)
    assert result.returncode == 0, result.stderr
    a, b = (read_results(tmp_path / "sweep" / job) for job in ("0", "1"))
    assert a["status"] == b["status"] == "completed"
    # The two jobs overlapped in time: each began (Hydra wrote its .hydra/config.yaml, before the job's imports
    # and start-up) before the other ended. Run one after the other, the second would begin after the first ended.
    began = [min(p.stat().st_mtime for p in (tmp_path / "sweep" / job).glob(".hydra/*/config.yaml")) for job in "01"]
    assert began[0] < b["finished_unix_time"] and began[1] < a["finished_unix_time"]
    assert a["torch_threads"] == b["torch_threads"] == max((os.cpu_count() or 1) // 2, 1)


def test_a_sweep_refuses_ddp_at_once_and_leaves_no_directory(tmp_path):
    outputs = tmp_path / "outputs"
    result = run_cli("train.py", ["-m", *DDP, "seed=1,2", f"outputs_dir={outputs}"])
    assert_user_error(result, "cannot launch DDP processes", "hydra/launcher=slurm")
    assert not list(outputs.rglob("*"))  # no sweep directory, job directory or empty outputs/multirun/<date>/


@needs_extra("hydra_plugins.hydra_optuna_sweeper", "sweeps")
def test_optuna_search_minimises_the_validation_loss(tmp_path):
    args = [
        "-m",
        "hparams_search=lr_optuna",
        "hydra.sweeper.n_trials=2",
        *TINY,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=10",
    ]
    result = run_cli("train.py", args)
    assert result.returncode == 0, result.stderr
    best = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "optim.lr" in best and "model.dropout" in best and "best_value" in best
    losses = [json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text())["final_val_loss"] for i in (0, 1)]
    assert f"best_value: {min(losses)}" in best


@needs_extra("hydra_plugins.hydra_optuna_sweeper", "sweeps")
def test_an_optuna_search_whose_every_trial_fails_ends_with_one_line(tmp_path):
    args = ["-m", "hparams_search=lr_optuna", "hydra.sweeper.n_trials=2", *TINY, "model.num_heads=3"]
    result = run_cli("train.py", [*args, f"hydra.sweep.dir={tmp_path / 'sweep'}", f"data.cache_dir={tmp_path}"])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and all("model.num_heads (3)" in line for line in errors[:2])  # one per trial
    assert errors[2].startswith("error: no trial of the sweep completed")
