"""The Python API: the runbook's own code, run as it is written, and the API's extras."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from nanollm import (
    CharTokenizer,
    TransformerLanguageModel,
    generate_text,
    load_checkpoint,
    load_model,
    set_seed,
    train_with_config,
)
from tests.conftest import SAMPLE, tiny_model
from tests.test_reliability import assert_same_state


def test_the_runbooks_code_runs_as_written(tmp_path, monkeypatch, capsys):
    """The runbook's calls in its order, with its argument names, file names and result access; only the
    imports (`from nanollm import ...`), num_steps/checkpoint_interval (lowered) and the hard-coded
    vocab_size=42 of its loading section (its own sample had 42 characters) differ."""
    monkeypatch.chdir(tmp_path)
    Path("data/raw").mkdir(parents=True)
    shutil.copy(SAMPLE, "data/raw/sample.txt")

    # --- Quick Start, step 2: train_nano.py -------------------------------------------------------
    tokenizer = CharTokenizer()
    tokenizer.build_vocab("data/raw/sample.txt")
    with open("data/raw/sample.txt", encoding="utf-8") as f:
        text = f.read()
    tokens = tokenizer.encode(text)
    print(f"Vocabulary size: {tokenizer.vocab_size}")
    print(f"Total tokens: {len(tokens)}")
    config = {
        "vocab_size": tokenizer.vocab_size,
        "embedding_dim": 32,
        "num_layers": 2,
        "ffn_hidden_dim": 64,
        "learning_rate": 1e-3,
        "num_steps": 40,
        "seed": 42,
        "checkpoint_dir": "checkpoints/nano",
        "checkpoint_interval": 20,
    }
    set_seed(config["seed"])
    model = TransformerLanguageModel(
        vocab_size=config["vocab_size"],
        embedding_dim=config["embedding_dim"],
        num_layers=config["num_layers"],
        ffn_hidden_dim=config["ffn_hidden_dim"],
    )
    print("Starting training...")
    results = train_with_config(model, tokens, config)
    print(f"Final loss: {results['final_loss']:.4f}")
    print(f"Final gradient norm: {results['final_grad_norm']:.4f}")
    print(f"Checkpoint saved to: {config['checkpoint_dir']}/checkpoint_final.pt")
    out = capsys.readouterr().out
    assert "Vocabulary size: 57\nTotal tokens: 42" in out and "Final loss: " in out
    assert 1.0 < results["final_loss"] < 4.0 and results["final_grad_norm"] > 0

    # --- Step 4: ls checkpoints/nano/ ---------------------------------------------------------------
    assert sorted(os.listdir("checkpoints/nano")) == ["checkpoint_final.pt", "checkpoint_step_20.pt"]
    # --- Checkpoints: the keys each file holds --------------------------------------------------------
    saved = torch.load("checkpoints/nano/checkpoint_final.pt", weights_only=True)
    assert {"model_state_dict", "optimizer_state_dict", "step", "loss", "config"} <= saved.keys()
    assert saved["step"] == 40 and saved["loss"] == pytest.approx(results["final_loss"])
    for name, value in saved["model_state_dict"].items():  # the same tensors as Lightning's entry: stored once
        assert value.untyped_storage().data_ptr() == saved["state_dict"][f"model.{name}"].untyped_storage().data_ptr()
    finished = {"weights": saved["state_dict"], "optimizer": saved["optimizer_states"]}

    # --- Resume training from checkpoint -------------------------------------------------------------
    results = train_with_config(model, tokens, config, resume_from="checkpoints/nano/checkpoint_step_20.pt")
    assert results["start_step"] == 20 and results["global_step"] == 40  # 20 steps, from the checkpoint on
    resumed = torch.load("checkpoints/nano/checkpoint_final.pt", weights_only=True)
    assert_same_state(finished, {"weights": resumed["state_dict"], "optimizer": resumed["optimizer_states"]})

    # --- Loading and Using a Trained Model ------------------------------------------------------------
    model = TransformerLanguageModel(
        vocab_size=tokenizer.vocab_size,  # the runbook writes 42: "Must match training"
        embedding_dim=32,
        num_layers=2,
        ffn_hidden_dim=64,
    )
    checkpoint_info = load_checkpoint("checkpoints/nano/checkpoint_final.pt", model)
    print(f"Loaded checkpoint from step {checkpoint_info['step']}")
    print(f"Checkpoint loss: {checkpoint_info['loss']:.4f}")
    model.eval()
    assert checkpoint_info["step"] == 40 and checkpoint_info.step == 40
    tokenizer = CharTokenizer()
    tokenizer.build_vocab("data/raw/sample.txt")
    output = generate_text(
        model=model, tokenizer=tokenizer, prompt="The quick", max_length=100, temperature=0.8, top_k=40, seed=42
    )
    print(output)
    assert output.startswith("The quick") and len(output) == len("The quick") + 100
    assert output == generate_text(model, tokenizer, "The quick", 100, 0.8, 40, 42)  # the seed fixes the text


def test_checkpoints_of_the_api_rebuild_the_model_alone_when_given_the_tokenizer(tmp_path):
    text = SAMPLE.read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    model = tiny_model(vocab_size=tokenizer.vocab_size, num_layers=1, context_length=16)
    config = {"num_steps": 7, "checkpoint_dir": str(tmp_path), "checkpoint_interval": 5, "progress_bar": False}
    result = train_with_config(model, tokenizer.encode(text[:4000]), config, tokenizer=tokenizer)
    # The final loss and grad norm are measured even when the steps do not fill a log interval (10 steps).
    assert result["global_step"] == 7 and result["final_loss"] is not None and result["final_grad_norm"] is not None
    loaded, loaded_tokenizer = load_model(tmp_path / "checkpoint_final.pt")
    assert loaded_tokenizer == tokenizer
    assert_same_state(dict(loaded.state_dict()), dict(model.state_dict()))
    step, loss = load_checkpoint(tmp_path / "checkpoint_final.pt", loaded)  # tuple unpacking works too
    assert step == 7 and loss == pytest.approx(result["final_loss"])
