"""End-to-end tests of train.py, run as a user runs it (a subprocess through Hydra)."""

import shutil

import pytest
import torch

from nanollm.api import compose_config
from nanollm.config import model_config_from
from nanollm.model import TransformerLanguageModel
from tests.conftest import LOGGED_SCALARS, assert_user_error, read_results, run_script, train_args
from tests.test_model import expected_parameters


def test_train_writes_checkpoints_tensorboard_and_results(trained_run):
    checkpoints = {p.name for p in (trained_run / "checkpoints").iterdir()}
    assert {"checkpoint_step_10.ckpt", "checkpoint_step_20.ckpt", "last.ckpt", "checkpoint_final.ckpt"} <= checkpoints
    results = read_results(trained_run)
    for key in (
        "num_parameters",
        "training_time_seconds",
        "final_train_loss",
        "final_val_loss",
        "final_val_perplexity",
        "final_grad_norm",
        "global_step",
    ):
        assert results[key] is not None, key
    assert results["global_step"] == 20
    assert results["final_val_perplexity"] == pytest.approx(
        torch.tensor(results["final_val_loss"]).exp().item(), rel=1e-5
    )
    assert results["final_val_loss"] < 4.0  # below an untrained model's ln(vocab) ~ 4.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_dir,) = {p.parent for p in (trained_run / "tensorboard").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(events_dir)).Reload()
    scalars = set(events.Tags()["scalars"])
    assert LOGGED_SCALARS <= scalars
    assert [e.step for e in events.Scalars("val/loss")] == [10, 20]  # x-axis: optimizer steps done
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20]


def test_checkpoints_are_named_by_their_step_with_uneven_intervals_and_accumulation(tmp_path):
    # Checkpoint and log intervals that do not divide each other, and two batches per optimizer step.
    args = [
        "trainer.max_steps=14",
        "checkpoint_interval=7",
        "trainer.log_every_n_steps=4",
        "trainer.val_check_interval=5",
    ]
    result = run_script("train.py", train_args(tmp_path, *args, "trainer.accumulate_grad_batches=2"))
    assert result.returncode == 0, result.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (7, 14):
        saved = torch.load(checkpoints / f"checkpoint_step_{step}.ckpt", weights_only=True)
        assert saved["global_step"] == step
        assert saved["CharDataModule"]["batches_served"] == 2 * step  # where a resumed run picks up the data
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_dir,) = {p.parent for p in (tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(events_dir)).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [4, 8, 12, 14]
    assert [e.step for e in events.Scalars("val/loss")] == [5, 10, 14]  # intervals count optimizer steps


def test_train_prints_summary_losses_checkpoint_and_sample(tmp_path):
    result = run_script("train.py", train_args(tmp_path, "sample.prompt='The '"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "parameters" in out and "vocabulary" in out and "train 38," in out and "device cpu" in out
    for label in ("final train loss", "final val loss", "perplexity", "final gradient norm", "checkpoint"):
        assert label in out
    assert "sample:\nThe " in out


def test_resume_continues_from_saved_step_and_matches_an_uninterrupted_run(trained_run, tmp_path):
    halfway = trained_run / "checkpoints" / "checkpoint_step_10.ckpt"
    result = run_script("train.py", train_args(tmp_path, f"ckpt_path={halfway}"))
    assert result.returncode == 0, result.stderr
    assert f"resuming from {halfway}" in result.stdout
    assert read_results(tmp_path / "run")["global_step"] == 20
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint_final.ckpt", weights_only=True)
    uninterrupted = torch.load(trained_run / "checkpoints" / "checkpoint_final.ckpt", weights_only=True)
    for key, value in uninterrupted["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_ckpt_path_last_resumes_the_newest_run(tmp_path):
    first = run_script("train.py", train_args(tmp_path, "trainer.max_steps=10", run="outputs/day/first"))
    assert first.returncode == 0, first.stderr
    second = run_script(
        "train.py", train_args(tmp_path, "ckpt_path=last", "trainer.max_steps=15", run="outputs/day/second")
    )
    assert second.returncode == 0, second.stderr
    assert f"resuming from {tmp_path / 'outputs/day/first/checkpoints'}" in second.stdout
    assert read_results(tmp_path / "outputs/day/second")["global_step"] == 15


def test_a_new_run_never_overwrites_another_runs_checkpoints(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").iterdir()}
    result = run_script("train.py", train_args(tmp_path))
    assert_user_error(result, "already holds checkpoints", "ckpt_path=last")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").iterdir()} == before


@pytest.mark.parametrize(
    "preset, dims",
    [("nano", (32, 2, 64)), ("small", (64, 4, 128)), ("medium", (128, 6, 256)), ("large", (384, 6, 1536))],
)
def test_presets_compose_and_report_their_parameter_counts(preset, dims):
    cfg = compose_config([f"model={preset}"])
    assert (cfg.model.embedding_dim, cfg.model.num_layers, cfg.model.ffn_hidden_dim) == dims
    assert cfg.optim.lr == cfg.model.recommended_lr and cfg.trainer.max_steps == cfg.model.recommended_steps
    model = TransformerLanguageModel(model_config_from(cfg, vocab_size=65))
    assert model.num_parameters() == expected_parameters(model.config)


def test_a_checkpoint_from_before_rope_generates_and_resumes_with_learned_positions(tmp_path):
    trained = run_script("train.py", train_args(tmp_path, "model.position_encoding=learned", "trainer.max_steps=10"))
    assert trained.returncode == 0, trained.stderr
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    # Checkpoints written before RoPE existed have no position_encoding key.
    del checkpoint["nanollm"]["model"]["position_encoding"]
    del checkpoint["hyper_parameters"]["model_config"]["position_encoding"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)

    texts = [
        run_script("generate.py", [f"ckpt_path={old}", "seed=2", "max_new_tokens=40", f"use_cache={cache}"])
        for cache in ("true", "false")
    ]
    assert texts[0].returncode == 0, texts[0].stderr
    assert texts[0].stdout == texts[1].stdout and len(texts[0].stdout) > 40

    with_rope = run_script("train.py", train_args(tmp_path, f"ckpt_path={old}", run="rope"))
    assert_user_error(with_rope, "model.position_encoding (checkpoint 'learned', config 'rope')")
    resumed = run_script(
        "train.py", train_args(tmp_path, f"ckpt_path={old}", "model.position_encoding=learned", run="ok")
    )
    assert resumed.returncode == 0, resumed.stderr
    assert read_results(tmp_path / "ok")["global_step"] == 20
