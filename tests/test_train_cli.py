"""End-to-end tests of train.py, run as a user runs it (through Hydra: `run_cli` runs the script's
`__main__` in this process, `run_script` in a new one)."""

import json

import pytest
import torch

from nanollm.api import compose_config
from nanollm.config import model_config_from
from nanollm.model import TransformerLanguageModel
from tests.conftest import LOGGED_SCALARS, assert_user_error, read_results, run_cli, train_args


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_dir,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(events_dir)).Reload()
    assert LOGGED_SCALARS <= set(events.Tags()["scalars"])
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_train_writes_checkpoints_tensorboard_and_results(trained_run):
    # 20 steps, checkpoints every 10: the last step is checkpoint_final (no step file duplicates it).
    checkpoints = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    assert checkpoints == ["best.ckpt", "checkpoint_final.ckpt", "checkpoint_step_10.ckpt", "last.ckpt"]
    results = read_results(trained_run)
    for key in ("num_parameters", "training_time_seconds", "final_train_loss", "final_grad_norm", "seed"):
        assert results[key] is not None, key
    assert results["global_step"] == 20 and results["start_step"] == 0 and results["status"] == "completed"
    assert results["final_val_perplexity"] == pytest.approx(math_exp(results["final_val_loss"]), rel=1e-5)
    assert results["final_val_loss"] < 3.7  # an untrained model scores ln(57) = 4.04
    assert results["tokens_seen"] == 20 * 8 * 32
    assert [step for step, _ in scalars(trained_run, "val/loss")] == [10, 20]  # x-axis: optimizer steps done
    assert [step for step, _ in scalars(trained_run, "train/loss")] == [5, 10, 15, 20]


def math_exp(x: float) -> float:
    return torch.tensor(x, dtype=torch.float64).exp().item()


def test_intervals_count_optimizer_steps_under_accumulation(tmp_path):
    # Checkpoint, log and validation intervals that do not divide each other, two batches per optimizer step.
    args = [
        "trainer.max_steps=14",
        "checkpoint_interval=7",
        "trainer.log_every_n_steps=4",
        "trainer.val_check_interval=5",
    ]
    result = run_cli("train.py", train_args(tmp_path, *args, "trainer.accumulate_grad_batches=2"))
    assert result.returncode == 0, result.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    for name, step in (("checkpoint_step_7.ckpt", 7), ("checkpoint_final.ckpt", 14)):
        saved = torch.load(checkpoints / name, weights_only=True)
        assert saved["global_step"] == step
        assert saved["CharDataModule"]["batches_served"] == 2 * step  # where a resumed run picks up the data
    assert [s for s, _ in scalars(tmp_path / "run", "train/loss")] == [4, 8, 12, 14]
    assert [s for s, _ in scalars(tmp_path / "run", "val/loss")] == [5, 10, 14]
    results = read_results(tmp_path / "run")
    assert results["tokens_seen"] == 14 * 2 * 8 * 32  # each optimizer step consumed two batches
    assert results["tokens_per_second"] == pytest.approx(
        results["tokens_seen"] / results["training_time_seconds"], rel=1e-2
    )


def test_train_prints_summary_losses_checkpoint_and_sample(tmp_path):
    result = run_cli("train.py", train_args(tmp_path, "sample.prompt='The '"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "parameters" in out and "vocabulary" in out and "train 38," in out and "device cpu" in out
    for label in ("final train loss", "final val loss", "perplexity", "final gradient norm", "checkpoint"):
        assert label in out
    assert "sample:\nThe " in out


def test_resume_continues_from_saved_step_and_matches_an_uninterrupted_run(trained_run, tmp_path):
    halfway = trained_run / "checkpoints" / "checkpoint_step_10.ckpt"
    result = run_cli("train.py", train_args(tmp_path, f"ckpt_path={halfway}"))
    assert result.returncode == 0, result.stderr
    assert f"resuming from {halfway}" in result.stdout and "changed settings" not in result.stdout
    assert read_results(tmp_path / "run")["start_step"] == 10
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint_final.ckpt", weights_only=True)
    uninterrupted = torch.load(trained_run / "checkpoints" / "checkpoint_final.ckpt", weights_only=True)
    for key, value in uninterrupted["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_ckpt_path_last_picks_the_newest_run_unless_this_run_has_checkpoints(tmp_path):
    def train(run, *extra):
        result = run_cli("train.py", train_args(tmp_path, "trainer.max_steps=10", *extra, run=f"outputs/day/{run}"))
        assert result.returncode == 0, result.stderr
        return result

    train("older")
    train("newer")
    resumed = train("third", "ckpt_path=last", "trainer.max_steps=12")
    assert f"resuming from {tmp_path / 'outputs/day/newer/checkpoints'}" in resumed.stdout
    # Back in the older run's own directory, its own checkpoints win over the newer runs'.
    again = train("older", "ckpt_path=last", "trainer.max_steps=12")
    assert f"resuming from {tmp_path / 'outputs/day/older/checkpoints'}" in again.stdout
    assert read_results(tmp_path / "outputs/day/older")["global_step"] == 12


# The README's table, with the bundled sample's 57-character vocabulary.
@pytest.mark.parametrize(
    "preset, dims, parameters",
    [
        ("nano", (32, 2, 64), 18_976),
        ("small", (64, 4, 128), 137_664),
        ("medium", (128, 6, 256), 802_432),
        ("large", (384, 6, 1536), 10_669_440),
    ],
)
def test_presets_compose_with_the_documented_sizes(preset, dims, parameters):
    cfg = compose_config([f"model={preset}"])
    assert (cfg.model.embedding_dim, cfg.model.num_layers, cfg.model.ffn_hidden_dim) == dims
    assert cfg.optim.lr == cfg.model.recommended_lr and cfg.trainer.max_steps == cfg.model.recommended_steps
    assert TransformerLanguageModel(model_config_from(cfg, vocab_size=57)).num_parameters() == parameters


def test_a_checkpoint_from_before_rope_and_activation_generates_and_resumes_with_their_old_meaning(tmp_path):
    trained = run_cli(
        "train.py",
        train_args(tmp_path, "model.position_encoding=learned", "model.activation=gelu_tanh", "trainer.max_steps=10"),
    )
    assert trained.returncode == 0, trained.stderr
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    # Checkpoints written before RoPE and model.activation existed have neither key.
    for key in ("position_encoding", "activation"):
        del checkpoint["nanollm"]["model"][key]
        del checkpoint["nanollm"]["config"]["model"][key]
        del checkpoint["hyper_parameters"]["model_config"][key]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)

    texts = [
        run_cli("generate.py", [f"ckpt_path={old}", "seed=2", "max_new_tokens=40", f"use_cache={cache}"])
        for cache in ("true", "false")
    ]
    assert texts[0].returncode == 0, texts[0].stderr
    assert texts[0].stdout == texts[1].stdout and len(texts[0].stdout) > 40

    # The architecture comes from the checkpoint: no model keys need repeating; contradicting one is an error.
    for key, saved, wanted in (("position_encoding", "learned", "rope"), ("activation", "gelu_tanh", "gelu")):
        contradicted = run_cli("train.py", train_args(tmp_path, f"ckpt_path={old}", f"model.{key}={wanted}", run=key))
        assert_user_error(contradicted, f"model.{key} (checkpoint '{saved}', config '{wanted}')")
    resumed = run_cli("train.py", train_args(tmp_path, f"ckpt_path={old}", run="ok"))
    assert resumed.returncode == 0, resumed.stderr
    assert read_results(tmp_path / "ok")["global_step"] == 20
    saved_model = torch.load(tmp_path / "ok" / "checkpoints" / "last.ckpt", weights_only=True)["nanollm"]["model"]
    assert (saved_model["position_encoding"], saved_model["activation"]) == ("learned", "gelu_tanh")


def test_debug_fast_runs_every_stage_in_a_few_steps(tmp_path):
    result = run_cli(
        "train.py", ["debug=fast", f"hydra.run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'c'}"]
    )
    assert result.returncode == 0, result.stderr
    results = read_results(tmp_path / "run")
    assert results["global_step"] == 20 and [h["step"] for h in results["val_history"]] == [10, 20]
    names = {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()}
    assert {"checkpoint_step_10.ckpt", "checkpoint_final.ckpt", "best.ckpt"} <= names
    assert "sample:\nThe " in result.stdout


def test_debug_overfit_memorises_one_fixed_batch(tmp_path):
    result = run_cli(
        "train.py",
        [
            "debug=overfit",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'c'}",
            "trainer.enable_progress_bar=false",
            "sample.max_new_tokens=0",
        ],
    )
    assert result.returncode == 0, result.stderr
    results = read_results(tmp_path / "run")
    # Four windows of 64 characters, seen 300 times: the training loss goes near zero, far below the
    # validation loss (text it never saw). Fresh batches would leave it near the validation loss.
    assert results["final_train_loss"] < 0.3 < results["final_val_loss"] - 1.0, json.dumps(results)[:400]
