"""Reliability guarantees: exact resume after kill -9, crash-safe saves, NaN guard, safe loading."""

import shutil
import signal
from pathlib import Path

import pytest
import torch

from nanollm import NanoLLMError, train_with_config
from nanollm.checkpointing import atomic_torch_save, read_checkpoint
from tests.conftest import SAMPLE, assert_user_error, read_results, run_cli, run_script, tiny_model, train_args

# Dropout on and two micro-batches per optimizer step, so the test also covers the random state that
# drives dropout and the step boundaries of gradient accumulation.
RESUMABLE = [
    "model.dropout=0.1",
    "trainer.max_steps=16",
    "trainer.accumulate_grad_batches=2",
    "checkpoint_interval=4",
    "trainer.val_check_interval=8",
]


def final_state(run_dir: Path) -> dict:
    """Everything that decides how training continues: weights, optimizer moments and schedule position."""
    saved = torch.load(run_dir / "checkpoints" / "checkpoint_final.ckpt", weights_only=True)
    return {"weights": saved["state_dict"], "optimizer": saved["optimizer_states"], "schedule": saved["lr_schedulers"]}


def assert_same_state(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli("train.py", train_args(tmp_path, *RESUMABLE))
    assert result.returncode == 0, result.stderr
    return tmp_path / "run"


# Batch 9 is the first micro-batch of optimizer step 5: a save there would hold half a step.
@pytest.mark.parametrize(
    "signum, exit_code, saved_step",
    [
        pytest.param(signal.SIGINT, 130, 5, id="ctrl-c"),
        pytest.param(signal.SIGTERM, 143, 5, id="sigterm"),
        pytest.param(signal.SIGKILL, -signal.SIGKILL, 4, id="kill-9"),
    ],
)
def test_a_signal_mid_step_then_resume_matches_an_uninterrupted_run(
    uninterrupted, tmp_path, signum, exit_code, saved_step
):
    args = train_args(tmp_path, *RESUMABLE)
    fault = [
        "+callbacks.fault._target_=tests.faults.SignalAt",
        "+callbacks.fault.batch=9",
        f"+callbacks.fault.signum={int(signum)}",
    ]
    stopped = run_script("train.py", [*args, *fault])
    assert stopped.returncode == exit_code, stopped.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == saved_step
    if signum != signal.SIGKILL:
        # Graceful: the step in progress is finished, saved and reported in one line and in results.json.
        cause = "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"
        assert_user_error(stopped, f"{cause} at step 5", "last.ckpt", "ckpt_path=last")
        results = read_results(tmp_path / "run")
        assert results["status"] == "interrupted" and results["stopped_by"] == signum.name
        assert results["global_step"] == 5
    # The same command, plus ckpt_path=last (in this process: only the interrupted run needs its own).
    resumed = run_cli("train.py", [*args, "ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {checkpoints}" in resumed.stdout
    assert_same_state(final_state(uninterrupted), final_state(tmp_path / "run"))
    ours, theirs = read_results(tmp_path / "run"), read_results(uninterrupted)
    for key in ("final_train_loss", "final_val_loss", "global_step", "val_history"):
        assert ours[key] == theirs[key], key
    # The resumed invocation's speed: its own steps over its own time (the earlier steps' time is not in it).
    tokens_per_step = ours["tokens_seen"] / ours["global_step"]
    trained = (ours["global_step"] - ours["start_step"]) * tokens_per_step
    assert ours["tokens_per_second"] == pytest.approx(trained / ours["training_time_seconds"], rel=0.05)


def test_a_second_ctrl_c_stops_at_once_and_names_the_checkpoints_kept(tmp_path):
    # Lightning turned the KeyboardInterrupt of a second Ctrl-C into a silent exit(1).
    fault = ["+callbacks.fault._target_=tests.faults.SignalAt", "+callbacks.fault.batch=9"]
    fault += [f"+callbacks.fault.signum={int(signal.SIGINT)}", "+callbacks.fault.times=2"]
    stopped = run_script("train.py", [*train_args(tmp_path, "checkpoint_interval=4"), *fault])
    assert stopped.returncode == 130, stopped.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    assert_user_error(stopped, "interrupted again", f"are in {checkpoints}", "ckpt_path=last")
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 8


def test_a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_newest_good_one(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for name in ("checkpoint_final.ckpt", "last.ckpt", "best.ckpt"):
        path = run / "checkpoints" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as by a full disk
    result = run_cli("train.py", [*train_args(tmp_path, "trainer.max_steps=25"), "ckpt_path=last"])
    assert result.returncode == 0, result.stderr
    assert "last.ckpt' is damaged" in result.stdout
    assert f"resuming from {run / 'checkpoints' / 'checkpoint_step_10.ckpt'}" in result.stdout
    assert read_results(run)["global_step"] == 25


def test_an_interrupted_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, target)
    original = target.read_bytes()

    def dies_halfway(obj, handle):
        handle.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(NanoLLMError, match=r"Could not save checkpoint .*last.ckpt.*No space left on device"):
        atomic_torch_save({"step": 2}, target)
    assert target.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_a_failing_save_stops_training_with_the_path_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    from nanollm import CharTokenizer

    text = SAMPLE.read_text(encoding="utf-8")[:5000]
    tokenizer = CharTokenizer.from_text(text)
    model = tiny_model(vocab_size=tokenizer.vocab_size, num_layers=1, context_length=16)
    real_save, saves = torch.save, []

    def disk_fills_up(obj, handle):
        saves.append(1)
        if len(saves) > 2:  # the checkpoints of steps 5 and 10 succeed, then the disk is full
            raise OSError(28, "No space left on device")
        real_save(obj, handle)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    config = {"num_steps": 20, "checkpoint_interval": 5, "checkpoint_dir": str(tmp_path), "progress_bar": False}
    with pytest.raises(NanoLLMError, match=r"Could not save checkpoint .*checkpoint_step_15.pt.*No space left"):
        train_with_config(model, tokenizer.encode(text), config, tokenizer=tokenizer)
    monkeypatch.setattr(torch, "save", real_save)
    assert read_checkpoint(tmp_path / "checkpoint_step_5.pt")["global_step"] == 5
    assert read_checkpoint(tmp_path / "checkpoint_step_10.pt")["global_step"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_step_10.pt", "checkpoint_step_5.pt"]


def test_a_full_disk_mid_run_stops_with_one_line_and_keeps_earlier_checkpoints(tmp_path):
    fault = ["+callbacks.fault._target_=tests.faults.DiskFullAt", "+callbacks.fault.step=11"]
    result = run_script("train.py", train_args(tmp_path, *fault, "checkpoint_interval=5"))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert_user_error(result, f"Could not save checkpoint '{checkpoints / 'checkpoint_step_15.ckpt'}'", "No space left")
    assert read_checkpoint(checkpoints / "checkpoint_step_10.ckpt")["global_step"] == 10
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 10
    assert not [p.name for p in checkpoints.iterdir() if ".tmp" in p.name]  # no temporary file left behind


def test_results_json_is_replaced_whole_or_not_at_all(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")
    before = (tmp_path / "run" / "results.json").read_bytes()
    fault = ["+callbacks.fault._target_=tests.faults.DiskFullAt", "+callbacks.fault.name=results.json"]
    result = run_script("train.py", [*train_args(tmp_path, "trainer.max_steps=25", *fault), "ckpt_path=last"])
    assert_user_error(result, "Could not save results", "results.json", "No space left")
    assert (tmp_path / "run" / "results.json").read_bytes() == before  # the earlier, valid file
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 25


def test_nan_loss_stops_at_once_naming_the_step(tmp_path):
    result = run_cli(
        "train.py", train_args(tmp_path, "optim.lr=1e30", "trainer.gradient_clip_val=null", "optim.warmup_steps=0")
    )
    # Nothing was saved before step 1: the advice is to start again, not to resume.
    assert_user_error(result, "Loss became NaN/Inf at step 1;", "Lower the learning rate", "start again")
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_diverged_weights_are_never_checkpointed_and_the_last_good_checkpoint_stays_the_newest(tmp_path):
    # Step 12 runs at an infinite rate: its loss is finite, the weights it leaves are not, and step 12 is
    # a checkpoint step (every 3 steps; losses are checked every 10).
    fault = ["+callbacks.fault._target_=tests.faults.InfiniteLearningRateAt", "+callbacks.fault.step=12"]
    args = [*fault, "checkpoint_interval=3", "trainer.log_every_n_steps=10", "trainer.gradient_clip_val=null"]
    result = run_cli("train.py", train_args(tmp_path, *args))
    assert_user_error(
        result,
        "Weights became NaN/Inf by step 12; no checkpoint was written",
        "Lower the learning rate",
        "ckpt_path=last",
    )
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint_step_*")) == [
        "checkpoint_step_3.ckpt",
        "checkpoint_step_6.ckpt",
        "checkpoint_step_9.ckpt",
    ]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 9
    for path in checkpoints.glob("*.ckpt"):  # best.ckpt included (step 10's validation, before step 12)
        state = torch.load(path, weights_only=True)
        assert state["global_step"] < 12 and all(torch.isfinite(v).all() for v in state["state_dict"].values()), path
    resumed = run_cli("train.py", [*train_args(tmp_path), "ckpt_path=last"])  # the fix: resume from the last good one
    assert resumed.returncode == 0, resumed.stderr
    assert read_results(tmp_path / "run")["start_step"] == 9


@pytest.mark.parametrize(
    "bounds, advice",
    [
        # Normal gradient norms (~1) sit above a lowered ceiling, or below a raised floor: a sustained stretch.
        (["callbacks.training_health.grad_norm_high=0.05"], "lower optim.lr"),
        (
            ["callbacks.training_health.grad_norm_low=50", "callbacks.training_health.grad_norm_high=100"],
            "raise optim.lr",
        ),
    ],
    ids=["too high", "too low"],
)
def test_sustained_gradient_norm_outside_the_range_warns_once_per_run(tmp_path, bounds, advice):
    # Two batches per optimizer step: the warning counts log intervals, not micro-batches.
    args = [
        *bounds,
        "callbacks.training_health.patience=2",
        "trainer.max_steps=40",
        "trainer.accumulate_grad_batches=2",
    ]
    result = run_cli("train.py", train_args(tmp_path, *args))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "outside the healthy range" in line]
    assert len(warnings) == 1 and advice in warnings[0], result.stdout
    assert "for 2 log intervals (step 10)" in warnings[0]  # log interval 5: the 2nd interval ends at step 10
    assert "outside the healthy range" in (tmp_path / "run" / "train.log").read_text()


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / ".pwned-marker",))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_without_running_it(trained_checkpoint, tmp_path):
    marker = Path(__file__).parent / ".pwned-marker"
    marker.unlink(missing_ok=True)
    evil = torch.load(trained_checkpoint, weights_only=True)
    evil["nanollm"]["payload"] = _RunsCode()
    torch.save(evil, tmp_path / "evil.ckpt")
    for result in (
        run_cli("generate.py", [f"ckpt_path={tmp_path / 'evil.ckpt'}"]),
        run_cli("eval.py", [f"ckpt_path={tmp_path / 'evil.ckpt'}", f"data.path={SAMPLE}"]),
        run_cli("train.py", train_args(tmp_path, f"ckpt_path={tmp_path / 'evil.ckpt'}")),
    ):
        assert_user_error(result, "Refused to load", "could run code")
    with pytest.raises(NanoLLMError, match="Refused to load"):
        read_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()
