"""The runbook's Python API, used as the runbook shows."""

from pathlib import Path

import pytest
import torch

from nanollm import (
    CharTokenizer,
    NanoLLMError,
    TransformerLanguageModel,
    generate_text,
    load_checkpoint,
    load_model,
    set_seed,
    train_with_config,
)
from tests.conftest import SAMPLE


def runbook_model(tokenizer):
    return TransformerLanguageModel(
        vocab_size=tokenizer.vocab_size,
        embedding_dim=32,
        num_layers=2,
        num_heads=4,
        ffn_hidden_dim=64,
        context_length=32,
    )


def test_runbook_flow_train_checkpoint_load_generate(tmp_path):
    text = SAMPLE.read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    set_seed(42)
    model = runbook_model(tokenizer)
    config = {
        "vocab_size": tokenizer.vocab_size,
        "embedding_dim": 32,
        "num_layers": 2,
        "ffn_hidden_dim": 64,
        "learning_rate": 3e-3,
        "num_steps": 30,
        "seed": 42,
        "checkpoint_dir": str(tmp_path / "ckpts"),
        "checkpoint_interval": 10,
        "batch_size": 16,
        "progress_bar": False,
    }
    result = train_with_config(model, tokenizer.encode(text), config, tokenizer=tokenizer)
    assert result["final_loss"] < 4.0 and result["final_grad_norm"] > 0 and result["global_step"] == 30
    names = {p.name for p in Path(config["checkpoint_dir"]).iterdir()}
    assert {
        "checkpoint_step_10.ckpt",
        "checkpoint_step_20.ckpt",
        "checkpoint_step_30.ckpt",
        "checkpoint_final.ckpt",
    } <= names

    fresh = runbook_model(tokenizer)
    step, loss = load_checkpoint(Path(config["checkpoint_dir"]) / "checkpoint_final.ckpt", fresh)
    assert step == 30 and loss == pytest.approx(result["final_loss"])
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    text_a = generate_text(fresh, tokenizer, "The ", max_length=30, temperature=0.8, top_k=40, seed=1)
    assert text_a.startswith("The ") and len(text_a) == 34
    assert text_a == generate_text(model, tokenizer, "The ", max_length=30, temperature=0.8, top_k=40, seed=1)

    # Resuming continues from the saved step, on the same Lightning path.
    config.update(num_steps=40, checkpoint_dir=str(tmp_path / "more"))
    resumed = train_with_config(
        fresh,
        tokenizer.encode(text),
        config,
        tokenizer=tokenizer,
        resume_from=Path(tmp_path / "ckpts" / "checkpoint_step_20.ckpt"),
    )
    assert resumed["global_step"] == 40

    # The checkpoint stores the vocabulary: the model can be rebuilt from the file alone.
    loaded, loaded_tok = load_model(Path(config["checkpoint_dir"]) / "checkpoint_final.ckpt")
    assert loaded_tok == tokenizer and loaded.num_parameters() == model.num_parameters()


def test_api_rejects_bad_input(tmp_path):
    tokenizer = CharTokenizer.from_text("abcdef")
    model = runbook_model(tokenizer)
    with pytest.raises(NanoLLMError, match="at least 2 tokens"):
        train_with_config(model, [1], {"checkpoint_dir": str(tmp_path)})
    with pytest.raises(NanoLLMError, match="context_length"):
        train_with_config(model, tokenizer.encode("abcdef" * 3), {"checkpoint_dir": str(tmp_path), "num_steps": 2})
    other = TransformerLanguageModel(
        vocab_size=6, embedding_dim=16, num_layers=1, num_heads=2, ffn_hidden_dim=32, context_length=8
    )
    (tmp_path / "x.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(NanoLLMError, match="damaged"):
        load_checkpoint(tmp_path / "x.ckpt", other)


def test_final_loss_and_grad_norm_are_measured_when_steps_do_not_fill_a_log_interval(tmp_path):
    tokenizer = CharTokenizer.from_text(SAMPLE.read_text(encoding="utf-8"))
    model = runbook_model(tokenizer)
    config = {"num_steps": 7, "checkpoint_dir": str(tmp_path), "checkpoint_interval": 5, "progress_bar": False}
    result = train_with_config(model, tokenizer.encode(SAMPLE.read_text(encoding="utf-8")[:4000]), config)
    assert result["global_step"] == 7  # the log interval is 10 steps
    assert result["final_loss"] is not None and result["final_grad_norm"] is not None
