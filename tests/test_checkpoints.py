"""Checkpoints beyond resuming: the best one, early stopping, keeping the newest K, fine-tuning
(`init_from`), a resume that changes settings or takes them from the checkpoint, and loading a
checkpoint as a LightningModule."""

import math

import pytest
import torch

from nanollm.model import ModelConfig
from nanollm.module import LanguageModelModule
from nanollm.start import Start, start_weights
from nanollm.tokenizer import CharTokenizer
from tests.conftest import SAMPLE, read_results, run_cli, train_args


def names(run_dir) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints").iterdir()}


def test_best_checkpoint_early_stopping_and_keeping_the_newest_k(tmp_path):
    # One batch seen over and over at a high rate: the validation loss falls, then rises as the model
    # memorises the batch, so early stopping ends the run and the best checkpoint is an early one.
    args = [
        "data.overfit_batches=1",
        "optim.lr=0.01",
        "trainer.max_steps=400",
        "trainer.val_check_interval=10",
        "checkpoint_interval=10",
        "checkpoint_keep=2",
        "callbacks=early_stopping",
        "callbacks.early_stopping.patience=2",
    ]
    result = run_cli("train.py", train_args(tmp_path, *args))
    assert result.returncode == 0, result.stderr
    results = read_results(tmp_path / "run")
    history = results["val_history"]
    best = min(history, key=lambda h: h["val_loss"])
    assert results["stopped_early"] and results["global_step"] < 400
    assert results["global_step"] == history[-1]["step"] == best["step"] + 2 * 10  # two validations without gain
    assert results["best_step"] == best["step"] and results["best_val_loss"] == best["val_loss"]
    assert results["best_checkpoint"] == str(tmp_path / "run" / "checkpoints" / "best.ckpt")
    assert torch.load(results["best_checkpoint"], weights_only=True)["global_step"] == best["step"]
    # Only the newest two step checkpoints are kept (the final step is checkpoint_final).
    last = results["global_step"]
    steps = sorted(
        int(n.split("_")[-1].split(".")[0]) for n in names(tmp_path / "run") if n.startswith("checkpoint_step")
    )
    assert steps == [last - 10, last]  # early stopping ended the run before max_steps, at a checkpoint step

    # ckpt_path=best: generate.py samples from it, and a new run resumes from it.
    generated = run_cli("generate.py", ["ckpt_path=best", f"outputs_dir={tmp_path}", "max_new_tokens=10"])
    assert generated.returncode == 0, generated.stderr
    more = ["ckpt_path=best", f"outputs_dir={tmp_path}", f"trainer.max_steps={last + 10}"]
    resumed = run_cli("train.py", train_args(tmp_path, *more, run="more"))
    assert resumed.returncode == 0, resumed.stderr
    assert read_results(tmp_path / "more")["start_step"] == best["step"]


def test_a_resume_takes_the_checkpoints_settings_and_applies_the_ones_changed(trained_run, tmp_path):
    # trained_run: warm-up 5, cosine to 0.1 x lr at step 20, lr 0.003 (nano's), checkpoints every 10 steps.
    halfway = trained_run / "checkpoints" / "checkpoint_step_10.ckpt"
    # No model keys, no data settings: they come from the checkpoint. A 10x lower rate and a longer run.
    args = [
        f"hydra.run.dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'c'}",
        "trainer.enable_progress_bar=false",
    ]
    result = run_cli("train.py", [*args, f"ckpt_path={halfway}", "optim.lr=0.0003", "trainer.max_steps=40"])
    assert result.returncode == 0, result.stderr
    assert "resuming with changed settings: optim.lr: 0.003 -> 0.0003; trainer.max_steps: 20 -> 40" in result.stdout
    results = read_results(tmp_path / "run")
    assert results["resumed_with_changes"] == ["optim.lr: 0.003 -> 0.0003", "trainer.max_steps: 20 -> 40"]
    assert results["num_parameters"] == read_results(trained_run)["num_parameters"]  # the checkpoint's model

    def lr_at(path) -> float:
        return torch.load(path, weights_only=True)["optimizer_states"][0]["param_groups"][0]["lr"]

    # The old cosine stood at phase pi/3 at step 10; from there it runs on to pi at the new max_steps.
    def multiplier(phase):
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(phase))

    assert lr_at(halfway) == pytest.approx(0.003 * multiplier(math.pi / 3), rel=1e-6)
    at_20 = lr_at(tmp_path / "run" / "checkpoints" / "checkpoint_step_20.ckpt")
    phase_20 = math.pi / 3 + (math.pi - math.pi / 3) * (20 - 10) / (40 - 10)
    assert at_20 == pytest.approx(0.0003 * multiplier(phase_20), rel=1e-6)
    assert at_20 < 0.0003 * multiplier(math.pi / 3)  # no jump back up to the peak


def test_seed_null_draws_a_seed_and_records_it(tmp_path):
    seeds = []
    for run in ("a", "b"):
        result = run_cli("train.py", train_args(tmp_path, "seed=null", "trainer.max_steps=5", run=run))
        assert result.returncode == 0, result.stderr
        seeds.append(read_results(tmp_path / run)["seed"])
        assert f"seed {seeds[-1]}" in result.stdout
    assert all(isinstance(s, int) for s in seeds) and seeds[0] != seeds[1]
    resumed = run_cli("train.py", train_args(tmp_path, "seed=null", "trainer.max_steps=8", "ckpt_path=last", run="a"))
    assert resumed.returncode == 0, resumed.stderr
    assert read_results(tmp_path / "a")["seed"] == seeds[0]  # the run's own seed, not a new draw


def test_fine_tuning_extends_the_vocabulary_and_beats_training_from_scratch(tmp_path):
    text = SAMPLE.read_text(encoding="utf-8")
    (tmp_path / "a.txt").write_text(text[: len(text) // 2], encoding="utf-8")
    # Text B: the other half, with two characters text A never has.
    (tmp_path / "b.txt").write_text(text[len(text) // 2 :].replace("e ", "é ").replace("th", "þh"), encoding="utf-8")
    common = ["optim.warmup_steps=10", "trainer.val_check_interval=40", "sample.max_new_tokens=0"]
    base = run_cli(
        "train.py", train_args(tmp_path, *common, f"data.path={tmp_path / 'a.txt'}", "trainer.max_steps=300", run="a")
    )
    assert base.returncode == 0, base.stderr
    on_b = [*common, f"data.path={tmp_path / 'b.txt'}", "trainer.max_steps=40"]
    scratch = run_cli("train.py", train_args(tmp_path, *on_b, run="scratch"))
    tuned = run_cli(
        "train.py",
        train_args(tmp_path, *on_b, f"init_from={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}", run="tuned"),
    )
    assert scratch.returncode == 0 and tuned.returncode == 0, tuned.stderr
    new_chars = sorted(
        set((tmp_path / "b.txt").read_text(encoding="utf-8")) - set((tmp_path / "a.txt").read_text(encoding="utf-8"))
    )
    assert {"é", "þ"} <= set(new_chars)
    assert f"{len(new_chars)} new character(s) added to the vocabulary" in tuned.stdout
    tuned_results, scratch_results = read_results(tmp_path / "tuned"), read_results(tmp_path / "scratch")
    assert tuned_results["added_characters"] == len(new_chars) and tuned_results["start_step"] == 0
    assert tuned_results["final_val_loss"] < scratch_results["final_val_loss"] - 0.1
    # The extended vocabulary: text A's characters keep their ids, the new ones come after.
    a_chars = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)["nanollm"]["tokenizer"][
        "chars"
    ]
    tuned_chars = torch.load(tmp_path / "tuned" / "checkpoints" / "last.ckpt", weights_only=True)["nanollm"][
        "tokenizer"
    ]["chars"]
    assert tuned_chars == a_chars + "".join(new_chars)
    generated = run_cli(
        "generate.py",
        [f"ckpt_path={tmp_path / 'tuned' / 'checkpoints' / 'last.ckpt'}", "prompt='þé'", "max_new_tokens=5"],
    )
    assert generated.returncode == 0, generated.stderr


def test_fine_tuning_keeps_the_trained_embedding_rows_and_initialises_new_ones_fresh():
    old_tokenizer = CharTokenizer.from_text("abcd")
    config = ModelConfig(vocab_size=4, embedding_dim=8, num_layers=1, num_heads=2, ffn_hidden_dim=16, context_length=8)
    from nanollm.model import TransformerLanguageModel

    torch.manual_seed(0)
    trained = TransformerLanguageModel(config)
    with torch.no_grad():
        trained.token_embedding.weight.add_(1.0)  # clearly unlike a fresh initialisation
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}}
    tokenizer = old_tokenizer.extended("abcxyz")
    start = Start(config=None, seed=0, kind="init", path="a.ckpt", checkpoint=checkpoint, tokenizer=old_tokenizer)
    model = start_weights(ModelConfig(**{**config.to_dict(), "vocab_size": tokenizer.vocab_size}), start)
    embedding = model.token_embedding.weight
    assert tokenizer.chars == ["a", "b", "c", "d", "x", "y", "z"]
    assert torch.equal(embedding[:4], trained.token_embedding.weight)
    assert embedding[4:].abs().mean() < 0.1  # N(0, 0.02), like any fresh row
    assert model.lm_head.weight is model.token_embedding.weight
    assert torch.equal(model.blocks[0].ffn.fc.weight, trained.blocks[0].ffn.fc.weight)


def test_load_from_checkpoint_restores_the_vocabulary(trained_checkpoint):
    module = LanguageModelModule.load_from_checkpoint(trained_checkpoint)
    saved = torch.load(trained_checkpoint, weights_only=True)
    assert module.tokenizer is not None and "".join(module.tokenizer.chars) == saved["nanollm"]["tokenizer"]["chars"]
    assert torch.equal(module.model.token_embedding.weight, saved["state_dict"]["model.token_embedding.weight"])
