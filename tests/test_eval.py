"""eval.py: sliding-window scoring counts every character once, with the context the model allows."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanollm.errors import NanoLLMError
from nanollm.evaluation import (
    checkpoints_in_directory,
    encode_text,
    evaluate,
    plan_windows,
    resolve_stride,
    score_tokens,
    summarize,
)
from nanollm.tokenizer import CharTokenizer
from tests.conftest import SAMPLE, run_cli, run_script, tiny_model

CONTEXT = 8


def random_ids(length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 11, size=length)


def brute_force_nll(model, ids: np.ndarray, stride: int) -> list[float]:
    """Each target j (ids[j + 1]) scored alone, from the window start the stride rule gives it."""
    targets = len(ids) - 1
    window = min(CONTEXT, targets)
    losses = []
    for j in range(targets):
        if j < window:
            start = 0  # the first window scores all its positions
        else:  # the window whose last `stride` positions hold j, or the end-aligned last window
            start = min(math.ceil((j - window + 1) / stride) * stride, targets - window)
        context = torch.as_tensor(ids[start : j + 1])[None]
        logits, _ = model(context)
        losses.append(F.cross_entropy(logits[0, -1], torch.tensor(int(ids[j + 1]))).item())
    return losses


@pytest.mark.parametrize("length", [2, 5, CONTEXT + 1, 30, 37])
@pytest.mark.parametrize("stride", [1, 3, CONTEXT])
def test_every_character_is_scored_once(length, stride):
    starts, first_scored, window = plan_windows(length, CONTEXT, stride)
    scored = [s + offset for s, first in zip(starts, first_scored, strict=True) for offset in range(first, window)]
    assert scored == list(range(length - 1))  # target j predicts ids[j + 1]: all but the first character
    assert window == min(CONTEXT, length - 1)
    # Past the first window, every character sees at least window - stride characters before it.
    assert all(first >= window - stride for first in first_scored[1:])
    nll_sum, count = score_tokens(tiny_model(), random_ids(length), stride, batch_size=2)
    assert count == length - 1 and nll_sum > 0


@pytest.mark.parametrize("position_encoding", ["rope", "learned"])
@pytest.mark.parametrize("length,stride", [(30, 1), (30, 3), (37, CONTEXT), (5, 2)])
def test_sliding_windows_match_scoring_each_character_alone(position_encoding, length, stride):
    model = tiny_model(position_encoding=position_encoding)
    ids = random_ids(length, seed=length + stride)
    expected = brute_force_nll(model, ids, stride)
    nll_sum, count = score_tokens(model, ids, stride, batch_size=3)  # several batches, the last one partial
    assert count == len(expected)
    assert nll_sum == pytest.approx(sum(expected), rel=1e-5)


def test_stride_changes_the_score_but_not_the_count():
    model, ids = tiny_model(), random_ids(60)
    full_context = score_tokens(model, ids, 1, batch_size=16)
    little_context = score_tokens(model, ids, CONTEXT - 1, batch_size=16)
    assert full_context[1] == little_context[1] == 59
    assert full_context[0] != pytest.approx(little_context[0], rel=1e-6)


def test_summary_is_loss_perplexity_and_bits_per_character():
    summary = summarize(nll_sum=69.3, count=50)
    assert summary["loss"] == pytest.approx(1.386)
    assert summary["perplexity"] == pytest.approx(math.exp(1.386))
    assert summary["bits_per_character"] == pytest.approx(1.386 / math.log(2))


def test_stride_defaults_to_half_the_context_and_must_fit_it():
    assert resolve_stride(None, 128) == 64 and resolve_stride(None, 1) == 1
    assert resolve_stride(CONTEXT, CONTEXT) == CONTEXT
    for bad in (0, -1, CONTEXT + 1, 2.5, True):
        with pytest.raises(NanoLLMError, match="eval.stride"):
            resolve_stride(bad, CONTEXT)


def test_unseen_characters_are_named_or_skipped_and_counted():
    tokenizer = CharTokenizer("abc ")
    with pytest.raises(NanoLLMError, match=r"'x'.*'z'.*eval\.unknown=skip"):
        encode_text(tokenizer, "abc xyz", "error", "t.txt")
    ids, skipped = encode_text(tokenizer, "abc xyz", "skip", "t.txt")
    assert tokenizer.decode(ids) == "abc " and skipped == 3
    with pytest.raises(NanoLLMError, match="at least 2"):
        encode_text(tokenizer, "axyz", "skip", "t.txt")


def test_sweep_and_run_directories_pick_best_else_last(tmp_path, capsys):
    sweep = tmp_path / "multirun" / "2026-01-01" / "10-00-00"
    jobs = {"0": ["last.ckpt"], "1": ["best.ckpt", "last.ckpt"], "2": ["last.ckpt"], "3": [], "10": ["last.ckpt"]}
    for job, names in jobs.items():
        (sweep / job / "checkpoints").mkdir(parents=True)
        for name in names:
            (sweep / job / "checkpoints" / name).touch()
    (sweep / "multirun.yaml").touch()
    # A job that failed at start-up has its results.json and no checkpoints/: it is named, not passed over.
    (sweep / "4").mkdir()
    (sweep / "4" / "results.json").write_text('{"status": "failed", "error": "model.num_heads (3) ..."}')
    picks = [
        "0/checkpoints/last.ckpt",
        "1/checkpoints/best.ckpt",
        "2/checkpoints/last.ckpt",
        "10/checkpoints/last.ckpt",
    ]
    assert checkpoints_in_directory(sweep) == ([sweep / p for p in picks], True)  # jobs 3 and 4 have none: skipped
    warnings = capsys.readouterr().err.splitlines()
    assert [w.split(":")[1].strip().rsplit("/", 1)[-1] for w in warnings] == ["3", "4"]
    assert "(the job failed: model.num_heads (3) ...)" in warnings[1]
    assert checkpoints_in_directory(sweep / "1") == ([sweep / "1/checkpoints/best.ckpt"], False)
    with pytest.raises(NanoLLMError, match="no checkpoints/best.ckpt"):
        checkpoints_in_directory(sweep / "3")


def test_skip_leaves_unseen_characters_out_of_the_count(trained_checkpoint, tmp_path):
    text = tmp_path / "unseen.txt"
    text.write_text("The sun \u2603 rose over the hill\u2603.", encoding="utf-8")
    (result,), several = evaluate(str(trained_checkpoint), str(text), None, 64, "skip", "cpu", tmp_path)
    assert not several
    assert result["skipped_characters"] == 2
    assert result["num_characters"] == len(text.read_text(encoding="utf-8")) - 2 - 1


# ---- through the entry point: one real process, the rest in this one (run_cli) -------------------
def test_an_output_file_that_appears_while_scoring_is_not_replaced(trained_checkpoint, tmp_path, monkeypatch):
    # The new-file check runs before scoring; another eval.py could create the file meanwhile.
    import nanollm.evaluation

    out = tmp_path / "scores.json"

    def another_writer_meanwhile(path):
        out.write_text("theirs")

    monkeypatch.setattr(nanollm.evaluation, "check_output_path", another_writer_meanwhile)
    data = tmp_path / "text.txt"
    data.write_text(SAMPLE.read_text(encoding="utf-8")[:500], encoding="utf-8")
    result = run_cli("eval.py", [f"ckpt_path={trained_checkpoint}", f"data.path={data}", f"output={out}"])
    assert result.returncode == 1 and "was created by something else meanwhile" in result.stderr
    assert "bits/char" in result.stdout  # the scores are printed all the same
    assert out.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.json", "text.txt"]


def test_eval_reports_loss_perplexity_and_bits_per_character(trained_checkpoint, tmp_path):
    out = tmp_path / "scores.json"
    result = run_script("eval.py", [f"ckpt_path={trained_checkpoint}", f"output={out}", "eval.batch_size=7"])
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    vocab = CharTokenizer.from_path(SAMPLE).vocab_size
    assert report["checkpoint"] == str(trained_checkpoint) and report["data_path"] == "data/raw/sample.txt"
    assert report["num_characters"] == len(SAMPLE.read_text(encoding="utf-8")) - 1
    assert report["skipped_characters"] == 0 and report["stride"] == 16  # half of the tiny model's context
    assert 0 < report["loss"] < math.log(vocab)  # trained: better than guessing uniformly
    assert report["bits_per_character"] == pytest.approx(report["loss"] / math.log(2))
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    header, row = result.stdout.splitlines()[:2]
    assert header.split() == ["checkpoint", "characters", "loss", "perplexity", "bits/char"]
    assert row.split() == [str(trained_checkpoint), f"{report['num_characters']:,}", f"{report['loss']:.4f}",
                           f"{report['perplexity']:.3f}", f"{report['bits_per_character']:.4f}"]  # fmt: skip


def test_a_list_of_runs_and_sweeps_prints_one_row_each_sorted_by_bits(trained_run, tmp_path):
    checkpoints = trained_run / "checkpoints"
    sweep = tmp_path / "sweep"
    jobs = {"0": {"best.ckpt": "checkpoint_step_10.ckpt", "last.ckpt": "last.ckpt"}, "1": {"last.ckpt": "last.ckpt"}}
    for job, files in jobs.items():
        (sweep / job / "checkpoints").mkdir(parents=True)
        for name, source in files.items():
            shutil.copy(checkpoints / source, sweep / job / "checkpoints" / name)
    out = tmp_path / "scores.json"
    result = run_cli("eval.py", [f"ckpt_path=[{sweep},{trained_run}]", f"output={out}"])
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    run_pick = checkpoints / ("best.ckpt" if (checkpoints / "best.ckpt").exists() else "last.ckpt")
    step_10 = str(sweep / "0/checkpoints/best.ckpt")  # job 0's best.ckpt wins over its last.ckpt
    assert {r["checkpoint"] for r in report} == {step_10, str(sweep / "1/checkpoints/last.ckpt"), str(run_pick)}
    bits = [r["bits_per_character"] for r in report]
    assert bits == sorted(bits) and report[-1]["checkpoint"] == step_10  # 10 steps of training score worst
    rows = result.stdout.splitlines()[1:4]
    assert [row.split()[0] for row in rows] == [r["checkpoint"] for r in report]
