"""allocator.keep_freed_memory: the page faults it saves, the settings it leaves alone, and who calls it."""

from __future__ import annotations

import sys

import pytest

import nanollm.allocator as allocator
import nanollm.evaluation
import nanollm.training
from tests.conftest import run_cli, run_python, train_args

# Page faults per forward pass of a small model on 4,096 tokens (tensors of 1-2 MB), with glibc's
# defaults and then with freed memory kept: on this machine about 1,300-1,600 against 0-50, but once
# 201.6 against 76.4 (glibc raises its mmap threshold by itself after some frees, so the default varies).
PAGE_FAULTS = """
import resource, torch
from nanollm.allocator import keep_freed_memory
from nanollm.model import ModelConfig, TransformerLanguageModel

torch.manual_seed(0)
model = TransformerLanguageModel(ModelConfig(65, 64, 2, 4, 128, context_length=64)).eval()
ids = torch.randint(0, 65, (64, 64))

def faults_per_forward():
    with torch.inference_mode():
        for _ in range(3):
            model(ids, ids)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            model(ids, ids)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

default = faults_per_forward()
assert keep_freed_memory()
print(default, faults_per_forward())
"""


@pytest.mark.skipif(not allocator.uses_glibc(), reason="the setting exists in glibc only")
def test_kept_memory_spares_each_batch_its_page_faults():
    default, kept = map(float, run_python(PAGE_FAULTS).split())
    assert kept * 2 < default, (default, kept)


def test_a_users_own_malloc_settings_win(monkeypatch):
    monkeypatch.setattr(allocator, "_kept", False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert allocator.keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")
    assert allocator.keep_freed_memory() is False
    assert allocator._kept is False


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_kept", False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False


def test_train_py_and_eval_py_keep_freed_memory(monkeypatch, tmp_path, trained_checkpoint):
    calls = []
    for module in (nanollm.training, nanollm.evaluation):
        monkeypatch.setattr(module, "keep_freed_memory", lambda name=module.__name__: calls.append(name))
    assert run_cli("train.py", train_args(tmp_path, "trainer.max_steps=2")).returncode == 0
    assert run_cli("eval.py", [f"ckpt_path={trained_checkpoint}", "data.path=data/raw/sample.txt"]).returncode == 0
    assert calls == ["nanollm.training", "nanollm.evaluation"]
