"""Shared helpers: tiny configs, running the real entry points, a trained checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "raw" / "sample.txt"

# A model and schedule small enough that a run takes a second or two.
TINY = [
    "model.embedding_dim=16",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.ffn_hidden_dim=32",
    "model.context_length=32",
    "data.batch_size=8",
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "trainer.log_every_n_steps=5",
    "trainer.enable_progress_bar=false",
    "optim.warmup_steps=5",
    "checkpoint_interval=10",
    "sample.max_new_tokens=20",
]

# The scalars every training run writes to TensorBoard.
LOGGED_SCALARS = {"train/loss", "val/loss", "val/perplexity", "train/lr", "train/grad_norm", "train/tokens_per_second"}


def run_script(
    script: str, args: list[str], cwd: Path = ROOT, timeout: int = 180, **kwargs
) -> subprocess.CompletedProcess:
    """Run train.py / generate.py exactly as a user would, capturing output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


def train_args(tmp_path: Path, *extra: str, run: str = "run") -> list[str]:
    """Tiny-run arguments that keep every file a run writes inside tmp_path."""
    return [
        *TINY,
        f"hydra.run.dir={tmp_path / run}",
        f"outputs_dir={tmp_path / 'outputs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        *extra,
    ]


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Non-zero exit, no traceback, and a one-line `error:` message naming the problem."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment.lower() in errors[0].lower(), errors[0]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny train.py run shared by the tests that only read its outputs."""
    tmp_path = tmp_path_factory.mktemp("trained")
    result = run_script("train.py", train_args(tmp_path))
    assert result.returncode == 0, result.stderr
    return tmp_path / "run"


@pytest.fixture(scope="session")
def trained_checkpoint(trained_run: Path) -> Path:
    return trained_run / "checkpoints" / "last.ckpt"
