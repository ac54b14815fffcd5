"""End-to-end tests of generate.py: a checkpoint alone is enough, and a seed makes it reproducible."""

import shutil

from tests.conftest import run_script


def generate(ckpt, *args, cwd=None):
    kwargs = {"cwd": cwd} if cwd else {}
    return run_script("generate.py", [f"ckpt_path={ckpt}", *args], **kwargs)


def test_generates_from_the_checkpoint_alone(trained_checkpoint, tmp_path):
    alone = tmp_path / "model.ckpt"
    shutil.copy(trained_checkpoint, alone)  # no config, data or run directory beside it
    result = generate(alone, "prompt='The '", "max_new_tokens=50", "seed=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The ") and len(result.stdout.rstrip("\n")) == 54
    assert list(tmp_path.iterdir()) == [alone]  # generation writes no files


def test_same_seed_same_text_and_greedy_is_deterministic(trained_checkpoint):
    a = generate(trained_checkpoint, "seed=5", "max_new_tokens=40", "num_samples=2")
    b = generate(trained_checkpoint, "seed=5", "max_new_tokens=40", "num_samples=2")
    c = generate(trained_checkpoint, "seed=6", "max_new_tokens=40", "num_samples=2")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout != c.stdout
    assert a.stdout.count("--- sample") == 2
    greedy = [generate(trained_checkpoint, "top_k=1", f"seed={s}", "max_new_tokens=30").stdout for s in (1, 2)]
    assert greedy[0] == greedy[1]


def test_cache_and_no_cache_print_the_same_text(trained_checkpoint):
    cached = generate(trained_checkpoint, "seed=3", "max_new_tokens=80", "use_cache=true")
    uncached = generate(trained_checkpoint, "seed=3", "max_new_tokens=80", "use_cache=false")
    assert cached.returncode == 0 and cached.stdout == uncached.stdout
