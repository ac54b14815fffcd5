"""The bad-input catalogue: every user mistake, through the real entry points.

Each case must exit non-zero with exactly one `error:` line naming the problem, print no
traceback, and leave every file that existed before untouched.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanollm import CharTokenizer, NanoLLMError, TransformerLanguageModel, generate_text, load_checkpoint
from tests.conftest import ROOT, SAMPLE, assert_user_error, run_script, train_args


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, trained_run):
    """Bad data files, a copy of a finished run and crafted checkpoints, shared by the cases."""
    ws = tmp_path_factory.mktemp("bad")
    (ws / "empty.txt").write_text("", encoding="utf-8")
    (ws / "one.txt").write_text("a", encoding="utf-8")
    (ws / "short.txt").write_text("just a few words here", encoding="utf-8")
    (ws / "binary.txt").write_bytes(b"ok text \x80\x81 more")
    (ws / "no_text").mkdir()
    (ws / "no_text" / "notes.md").write_text("not a .txt file", encoding="utf-8")
    shutil.copytree(trained_run, ws / "done")
    (ws / "damaged.ckpt").write_bytes((trained_run / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    torch.save({"state_dict": {}, "epoch": 0}, ws / "foreign.ckpt")
    return ws


def snapshot(root: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


TRAIN_CASES = {
    "missing file": (["data.path={ws}/missing.txt"], ["missing.txt", "does not exist"]),
    "empty file": (["data.path={ws}/empty.txt"], ["Token sequence must have at least 2 tokens"]),
    "one character": (["data.path={ws}/one.txt"], ["Token sequence must have at least 2 tokens"]),
    "binary file": (["data.path={ws}/binary.txt"], ["binary.txt", "not valid UTF-8", "offset 8"]),
    "shorter than context": (["data.path={ws}/short.txt"], ["context_length"]),
    "directory without text": (["data.path={ws}/no_text"], ["no .txt files"]),
    "heads do not divide width": (["model.num_heads=3"], ["model.embedding_dim (16)", "model.num_heads (3)"]),
    "zero width": (["model.embedding_dim=0"], ["model.embedding_dim", "positive integer"]),
    "negative layers": (["model.num_layers=-1"], ["model.num_layers"]),
    "zero context": (["model.context_length=0"], ["model.context_length"]),
    "dropout 1": (["model.dropout=1.0"], ["model.dropout", "[0, 1)"]),
    "negative dropout": (["model.dropout=-0.1"], ["model.dropout"]),
    "unknown position encoding": (["model.position_encoding=alibi"], ["model.position_encoding", "rope, learned"]),
    "odd head size with rope": (
        ["model.embedding_dim=18", "model.num_heads=2"],
        ["even head size", "model.position_encoding=learned"],
    ),
    "zero learning rate": (["optim.lr=0"], ["optim.lr", "> 0"]),
    "negative learning rate": (["optim.lr=-0.001"], ["optim.lr"]),
    "zero batch": (["data.batch_size=0"], ["data.batch_size", ">= 1"]),
    "zero steps": (["trainer.max_steps=0"], ["trainer.max_steps", ">= 1"]),
    "text where a number goes": (["model.num_layers=two"], ["model.num_layers"]),
    "unknown preset": (["model=huge"], ["unknown model 'huge'", "nano"]),
    "unknown trainer": (["trainer=tpu"], ["unknown trainer 'tpu'"]),
    "missing checkpoint": (["ckpt_path={ws}/nope.ckpt"], ["nope.ckpt", "does not exist"]),
    "damaged checkpoint": (["ckpt_path={ws}/damaged.ckpt"], ["damaged.ckpt", "damaged"]),
    "text file as checkpoint": ([f"ckpt_path={SAMPLE}"], ["sample.txt", "not a checkpoint"]),
    "foreign checkpoint": (["ckpt_path={ws}/foreign.ckpt"], ["foreign.ckpt", "not a nanollm checkpoint"]),
    "other architecture": (
        ["ckpt_path={ws}/done/checkpoints/last.ckpt", "model.embedding_dim=32", "model.num_heads=4"],
        ["different architecture", "model.embedding_dim (checkpoint 16, config 32)"],
    ),
    "new run over an old one": (["hydra.run.dir={ws}/done"], ["already holds checkpoints", "ckpt_path=last"]),
}
GENERATE_CASES = {
    "no checkpoint given": ([], ["ckpt_path is required"]),
    "missing checkpoint": (["ckpt_path={ws}/nope.ckpt"], ["does not exist"]),
    "damaged checkpoint": (["ckpt_path={ws}/damaged.ckpt"], ["damaged"]),
    "foreign checkpoint": (["ckpt_path={ws}/foreign.ckpt"], ["not a nanollm checkpoint"]),
    "unseen prompt characters": (
        ["ckpt_path={ws}/done/checkpoints/last.ckpt", "prompt='Zq~'"],
        ["prompt", "never saw", "'~'"],
    ),
    "negative max_new_tokens": (
        ["ckpt_path={ws}/done/checkpoints/last.ckpt", "max_new_tokens=-1"],
        ["max_new_tokens", ">= 0"],
    ),
    "zero temperature": (["ckpt_path={ws}/done/checkpoints/last.ckpt", "temperature=0"], ["temperature", "> 0"]),
    "negative temperature": (["ckpt_path={ws}/done/checkpoints/last.ckpt", "temperature=-1"], ["temperature"]),
    "zero top_k": (["ckpt_path={ws}/done/checkpoints/last.ckpt", "top_k=0"], ["top_k", ">= 1"]),
}


@pytest.mark.parametrize(
    "script, args, fragments",
    [pytest.param("train.py", a, f, id=f"train: {k}") for k, (a, f) in TRAIN_CASES.items()]
    + [pytest.param("generate.py", a, f, id=f"generate: {k}") for k, (a, f) in GENERATE_CASES.items()],
)
def test_bad_input_fails_with_one_clear_line_and_touches_nothing(workspace, tmp_path, script, args, fragments):
    args = [a.format(ws=workspace) for a in args]
    before = snapshot(workspace)
    if script == "train.py":
        args = train_args(tmp_path, *args)
    result = run_script(script, args)
    assert_user_error(result, *(f.format(ws=workspace) for f in fragments))
    after = snapshot(workspace)
    assert {path: after.get(path) for path in before} == before  # every existing file is untouched
    assert not list(tmp_path.rglob("*.ckpt"))


def test_api_bad_inputs_raise_one_clear_error(workspace, tmp_path):
    tokenizer = CharTokenizer.from_text("abcdef")
    model = TransformerLanguageModel(
        vocab_size=6, embedding_dim=16, num_layers=1, num_heads=2, ffn_hidden_dim=32, context_length=8
    )
    from nanollm import train_with_config

    cases = [
        (lambda: train_with_config(model, [1], {"checkpoint_dir": str(tmp_path)}), "at least 2 tokens"),
        (lambda: train_with_config(model, [0, 1, 2] * 3, {"checkpoint_dir": str(tmp_path)}), "context_length"),
        (
            lambda: train_with_config(model, [0, 9] * 50, {"checkpoint_dir": str(tmp_path)}),
            "outside the model's vocabulary",
        ),
        (
            lambda: train_with_config(model, [0, 1] * 50, {"checkpoint_dir": str(tmp_path), "learning_rate": -1}),
            "optim.lr",
        ),
        (lambda: load_checkpoint(workspace / "damaged.ckpt", model), "damaged"),
        (lambda: load_checkpoint(workspace / "done/checkpoints/last.ckpt", model), "different shape"),
        (lambda: generate_text(model, tokenizer, "xyz", max_length=5), "never saw"),
        (lambda: generate_text(model, tokenizer, "abc", max_length=5, temperature=0), "temperature"),
    ]
    for call, message in cases:
        with pytest.raises(NanoLLMError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_ctrl_c_saves_a_checkpoint_exits_cleanly_and_resumes(tmp_path):
    args = train_args(tmp_path, "trainer.max_steps=100000", "checkpoint_interval=50")
    command = [sys.executable, str(ROOT / "train.py"), *args]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = tmp_path / "run" / "checkpoints" / "checkpoint_step_50.ckpt"
    deadline = time.time() + 60
    while not first.exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 130
    assert_user_error(result, "interrupted at step", "last.ckpt", "ckpt_path=last")
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] >= 50
    resumed = run_script(
        "train.py", [*train_args(tmp_path, f"trainer.max_steps={saved['global_step'] + 5}"), "ckpt_path=last"]
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and os.path.exists(tmp_path / "run" / "results.json")
