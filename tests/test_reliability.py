"""Reliability guarantees: exact resume after kill -9, crash-safe saves, NaN guard, safe loading."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanollm import NanoLLMError, train_with_config
from nanollm.checkpointing import atomic_torch_save, read_checkpoint
from tests.conftest import ROOT, SAMPLE, assert_user_error, read_results, run_script, train_args

# Dropout on, so the test also covers the random state that drives it.
RESUMABLE = ["model.dropout=0.1", "trainer.max_steps=240", "checkpoint_interval=6", "trainer.val_check_interval=120"]


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "checkpoint_final.ckpt", weights_only=True)["state_dict"]


def test_kill_9_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = run_script("train.py", train_args(tmp_path, *RESUMABLE, run="reference"))
    assert reference.returncode == 0, reference.stderr
    expected = final_state(tmp_path / "reference")
    rng = random.Random(2024)
    for attempt in range(3):
        run = f"killed{attempt}"
        args = train_args(tmp_path, *RESUMABLE, run=run)
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        checkpoints = tmp_path / run / "checkpoints"
        while not list(checkpoints.glob("checkpoint_step_*.ckpt")) and process.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL, "training finished before it could be killed"
        resumed = run_script("train.py", [*args, "ckpt_path=last"])  # the same command, plus ckpt_path=last
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming from {checkpoints}" in resumed.stdout
        state = final_state(tmp_path / run)
        assert all(torch.equal(expected[k], state[k]) for k in expected), f"weights differ after kill {attempt}"
        ours, theirs = read_results(tmp_path / run), read_results(tmp_path / "reference")
        for key in ("final_train_loss", "final_val_loss", "global_step"):
            assert ours[key] == theirs[key], key


def test_a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_newest_good_one(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for name in ("checkpoint_step_20.ckpt", "checkpoint_final.ckpt", "last.ckpt"):
        path = run / "checkpoints" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as by a full disk
    result = run_script("train.py", [*train_args(tmp_path, "trainer.max_steps=25"), "ckpt_path=last"])
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
    from nanollm import CharTokenizer, TransformerLanguageModel

    text = SAMPLE.read_text(encoding="utf-8")[:5000]
    tokenizer = CharTokenizer.from_text(text)
    model = TransformerLanguageModel(
        vocab_size=tokenizer.vocab_size,
        embedding_dim=16,
        num_layers=1,
        num_heads=2,
        ffn_hidden_dim=32,
        context_length=16,
    )
    real_save, saves = torch.save, []

    def disk_fills_up(obj, handle):
        saves.append(1)
        if len(saves) > 2:  # step 5's checkpoint and last.ckpt succeed, then the disk is full
            raise OSError(28, "No space left on device")
        real_save(obj, handle)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    config = {"num_steps": 20, "checkpoint_interval": 5, "checkpoint_dir": str(tmp_path), "progress_bar": False}
    with pytest.raises(NanoLLMError, match=r"Could not save checkpoint .*checkpoint_step_10.ckpt.*No space left"):
        train_with_config(model, tokenizer.encode(text), config, tokenizer=tokenizer)
    monkeypatch.setattr(torch, "save", real_save)
    assert read_checkpoint(tmp_path / "checkpoint_step_5.ckpt")["global_step"] == 5
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 5


def test_nan_loss_stops_at_once_naming_the_step_and_saves_no_diverged_weights(tmp_path):
    result = run_script(
        "train.py", train_args(tmp_path, "optim.lr=1e30", "trainer.gradient_clip_val=null", "optim.warmup_steps=0")
    )
    assert_user_error(result, "Loss became NaN/Inf at step", "Lower the learning rate")
    for path in (tmp_path / "run").rglob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path


def test_sustained_gradient_norm_outside_the_range_warns_once(tmp_path):
    # Normal gradient norms (~1) sit above a lowered ceiling, so the stretch is sustained.
    args = [
        "callbacks.training_health.grad_norm_high=0.05",
        "callbacks.training_health.patience=2",
        "trainer.max_steps=40",
    ]
    result = run_script("train.py", train_args(tmp_path, *args))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if "outside the healthy range" in line]
    assert len(warnings) == 1 and "lower optim.lr" in warnings[0]


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
        run_script("generate.py", [f"ckpt_path={tmp_path / 'evil.ckpt'}"]),
        run_script("train.py", train_args(tmp_path, f"ckpt_path={tmp_path / 'evil.ckpt'}")),
    ):
        assert_user_error(result, "Refused to load", "could run code")
    with pytest.raises(NanoLLMError, match="Refused to load"):
        read_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()
