"""Shared helpers: tiny configs, running the real entry points, a trained checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The suite runs two workers on a 2-core machine: one thread per process (and per subprocess it starts)
# instead of two each, which oversubscribes the cores and slows every test.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "raw" / "sample.txt"


def needs_extra(module: str, extra: str) -> pytest.MarkDecorator:
    """Skip a test whose optional extra is not installed (`make` installs every extra)."""
    import importlib.util

    try:
        missing = importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # its parent package is missing too (hydra_plugins without any plugin)
        missing = True
    return pytest.mark.skipif(missing, reason=f"needs the {extra} extra (pip install -e '.[{extra}]')")


def tiny_model(**overrides):
    """A seeded model for unit tests, in evaluation mode: vocabulary 11, width 16, 2 layers of 2 heads,
    feed-forward 32, context 8; any ModelConfig field can be overridden."""
    from nanollm.model import ModelConfig, TransformerLanguageModel

    torch.manual_seed(0)
    settings = dict(vocab_size=11, embedding_dim=16, num_layers=2, num_heads=2, ffn_hidden_dim=32, context_length=8)
    return TransformerLanguageModel(ModelConfig(**{**settings, **overrides})).eval()


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
    script: str, args: list[str], cwd: Path = ROOT, timeout: int = 180, env_extra: dict | None = None, **kwargs
) -> subprocess.CompletedProcess:
    """Run train.py / generate.py / eval.py in a new process exactly as a user would, capturing output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


def run_python(code: str, *args: str) -> str:
    """Run a short Python program in a fresh process (from the repo root) and return its standard output;
    for what only a new process shows: imports, page faults, a malloc setting."""
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def run_cli(script: str, args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run train.py / generate.py / eval.py in this process, exactly as `python <script> <args>` does (its
    `__main__` block: Hydra, the config checks, the one-line errors), without the ~4 s a new Python
    process costs.

    For cases that fail before training or train for a few steps; a run that needs its own process
    (signals, DDP, kill -9) uses `run_script`.
    """
    import contextlib
    import gc
    import io
    import runpy
    import traceback

    from hydra.core.hydra_config import HydraConfig

    import nanollm.cli

    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [str(ROOT / script), *args]
    code = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:  # a bug: shown as a traceback, as the interpreter would print it
                traceback.print_exc()
                code = 1
    finally:
        gc.unfreeze()  # the entry point froze this process's objects for a quick exit; the test process goes on
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        nanollm.cli._job_started = nanollm.cli._run_logged = False
        HydraConfig.instance().cfg = None  # later API calls in this process are not inside a Hydra app
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
    return subprocess.CompletedProcess([script, *args], code, stdout.getvalue(), stderr.getvalue())


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
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert not "".join(lines[lines.index(errors[0]) + 1 :]).strip(), result.stderr  # the message is one line
    for fragment in fragments:
        assert fragment.lower() in errors[0].lower(), errors[0]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny train.py run shared by the tests that only read its outputs."""
    tmp_path = tmp_path_factory.mktemp("trained")
    result = run_cli("train.py", train_args(tmp_path))
    assert result.returncode == 0, result.stderr
    return tmp_path / "run"


@pytest.fixture(scope="session")
def trained_checkpoint(trained_run: Path) -> Path:
    return trained_run / "checkpoints" / "last.ckpt"


# The modules whose tests start whole processes (DDP, two nodes, signals) take most of the suite's time.
# Collected first, they are spread over the workers from the start instead of all landing at the end,
# where one worker would run the last of them while the other waits.
SLOW_FIRST = ("test_scale.py", "test_reliability.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in SLOW_FIRST)  # stable: the order within each part is kept
