"""Scoring text with checkpoints: loss, perplexity and bits per character over a whole corpus.

Every character after the first is scored exactly once, with as much context as the model allows:
windows of `context_length` characters slide by `stride`, and each window scores only the
positions no earlier window scored. With non-overlapping windows the first characters of each
window would be predicted from almost nothing; here every scored character past the first window
sees at least `context_length - stride` characters before it.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nanollm.allocator import keep_freed_memory
from nanollm.checkpointing import (
    BEST_NAME,
    LAST_NAME,
    model_from_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
    run_record,
)
from nanollm.corpus import DEFAULT_GLOB, iter_text, list_text_files
from nanollm.errors import NanoLLMError
from nanollm.generation import rolling_log_likelihood
from nanollm.tokenizer import CharTokenizer

UNKNOWN_CHOICES = ("error", "skip")
# "windows": sliding windows (eval.stride), as the model reads text it is given whole. "rolling": one
# character at a time through the rolling KV cache, as generate.py's beyond_context=rolling reads the
# text it writes past the context; comparing the two measures what rolling costs in quality.
METHODS = ("windows", "rolling")
PRECISIONS = ("32", "bf16")


# ---- scoring --------------------------------------------------------------------------------
def resolve_stride(stride: int | None, context_length: int) -> int:
    """The stride to use: `null` is half the context; anything outside 1..context is refused."""
    if stride is None:
        return max(1, context_length // 2)
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= context_length:
        raise NanoLLMError(
            f"eval.stride must be an integer from 1 to the model's context length ({context_length}), got {stride!r}; "
            "eval.stride=null uses half the context."
        )
    return stride


def plan_windows(num_tokens: int, context_length: int, stride: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Window starts, the first scored offset in each window, and the window length.

    A window at `start` feeds tokens [start, start + window) and predicts [start + 1, start + window].
    The first window scores all its positions, each later one the positions past the previous
    window's end, and the last is aligned to the end of the text: every token after the first is
    predicted exactly once.
    """
    targets = num_tokens - 1
    window = min(context_length, targets)
    if targets > window:
        starts = np.append(np.arange(0, targets - window, stride), targets - window)
    else:
        starts = np.zeros(1, dtype=np.int64)
    first_scored = np.concatenate(([0], starts[:-1] + window - starts[1:]))
    return starts, first_scored, window


@torch.inference_mode()
def score_tokens(
    model: torch.nn.Module, ids: np.ndarray | torch.Tensor, stride: int, batch_size: int, progress: bool = False
) -> tuple[float, int]:
    """Sum of the negative log-likelihoods (nats) of `ids[1:]` under `model`, and how many were scored."""
    if len(ids) < 2:
        raise NanoLLMError(f"Need at least 2 characters to score (the first has no context), got {len(ids)}.")
    context_length = model.config.context_length
    stride = resolve_stride(stride, context_length)
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=device)
    starts, first_scored, window = plan_windows(len(ids), context_length, stride)
    offsets = torch.arange(window, device=device)
    was_training = model.training
    model.eval()  # dropout would make the scores random
    bar = _progress_bar(len(ids) - 1, progress)
    nll_sum, count = 0.0, 0
    try:
        for i in range(0, len(starts), batch_size):
            positions = torch.as_tensor(starts[i : i + batch_size], device=device)[:, None] + offsets  # (B, T)
            logits, _ = model(ids[positions])  # (B, T, vocab)
            scored = offsets >= torch.as_tensor(first_scored[i : i + batch_size], device=device)[:, None]
            targets = ids[positions + 1][scored]
            # float32 whatever the model's dtype; summed in float64 across batches.
            nll_sum += F.cross_entropy(logits[scored].float(), targets, reduction="sum").item()
            count += targets.numel()
            if bar is not None:
                bar.update(targets.numel())
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return nll_sum, count


def summarize(nll_sum: float, count: int) -> dict:
    """Mean loss (nats), perplexity and bits per character from a sum of negative log-likelihoods."""
    loss = nll_sum / count
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_character": loss / math.log(2)}


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # disable=None: drawn on a terminal only, so logs and captured output stay clean.
    return tqdm(total=total, unit="char", unit_scale=True, desc="Scoring", leave=False, disable=None)


# ---- text -------------------------------------------------------------------------------------
def read_text(data_path: str | Path, glob: str = DEFAULT_GLOB) -> str:
    """The whole corpus as one string, read exactly as training reads it (same files, order, UTF-8 checks)."""
    return "".join(iter_text(list_text_files(data_path, glob)))


def encode_text(tokenizer: CharTokenizer, text: str, unknown: str, data_path: str | Path) -> tuple[np.ndarray, int]:
    """Token ids of `text` and how many characters were skipped (`unknown="skip"` drops unseen characters)."""
    if unknown == "skip":
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        known = np.isin(codes, np.array([ord(c) for c in tokenizer.chars], dtype=np.uint32))
        text = codes[known].tobytes().decode("utf-32-le")
        skipped = int(codes.size - known.sum())
    else:
        skipped = 0
    try:
        ids = tokenizer.encode_array(text, np.int64, what=f"Data path '{data_path}'")
    except NanoLLMError as err:
        raise NanoLLMError(f"{err} Or pass eval.unknown=skip to leave them out of the score.") from None
    if len(ids) < 2:
        kept = f" after skipping {skipped} unseen" if skipped else ""
        raise NanoLLMError(
            f"Data path '{data_path}' has {len(ids)} character(s){kept}; scoring needs at least 2 "
            "(the first has no context). Point data.path at more text."
        )
    return ids, skipped


# ---- checkpoints ------------------------------------------------------------------------------
def checkpoint_files(ckpt_path: str | list[str], outputs_dir: Path) -> tuple[list[tuple[Path, dict]], bool]:
    """The checkpoints `ckpt_path` names, loaded, and whether it named a collection (a list or a sweep).

    Accepts a file, `last` / `best` (resolve_checkpoint), a run directory (its best.ckpt, else
    last.ckpt), a sweep directory (the same for each job), or a list of any of these.
    """
    several = isinstance(ckpt_path, list)
    names = [str(name) for name in ckpt_path] if several else [str(ckpt_path)]
    if not names:
        raise NanoLLMError("ckpt_path is an empty list: pass ckpt_path='[a.ckpt,b.ckpt]' or a single path.")
    found = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            paths, is_sweep = checkpoints_in_directory(path)
            several |= is_sweep
            found += [(p, read_checkpoint(p)) for p in paths]
        else:
            found.append(resolve_checkpoint(name, None, outputs_dir, warn=lambda line: print(line, file=sys.stderr)))
    return found, several


def checkpoints_in_directory(directory: Path) -> tuple[list[Path], bool]:
    """best.ckpt (else last.ckpt) of a run directory, or of each job of a sweep directory; True for a sweep."""
    own = _best_or_last(directory / "checkpoints") or _best_or_last(directory)
    if own is not None:
        return [own], False
    # A sweep's jobs: every one has a results.json (a failed one too) or checkpoints.
    jobs = [p for p in directory.iterdir() if (p / "checkpoints").is_dir() or (p / "results.json").is_file()]
    picks = []
    for job in sorted(jobs, key=_natural_key):
        pick = _best_or_last(job / "checkpoints")
        if pick is None:
            print(f"warning: skipping {job}: no checkpoints/{BEST_NAME} or checkpoints/{LAST_NAME}{_failed(job)}.",
                  file=sys.stderr)  # fmt: skip
        else:
            picks.append(pick)
    if not picks:
        raise NanoLLMError(
            f"Directory '{directory}' holds no checkpoints/{BEST_NAME} or checkpoints/{LAST_NAME}, nor job "
            "subdirectories with one. Pass a run directory, a sweep directory (outputs/multirun/<date>/<time>) or a .ckpt file."
        )
    return picks, True


def _failed(job: Path) -> str:
    """`` (the job failed: <its error>)`` when the job's results.json records a failure."""
    record = run_record(job) or {}
    return f" (the job failed: {record.get('error')})" if record.get("status") == "failed" else ""


def _best_or_last(checkpoint_dir: Path) -> Path | None:
    for name in (BEST_NAME, LAST_NAME):
        if (checkpoint_dir / name).is_file():
            return checkpoint_dir / name
    return None


def _natural_key(path: Path) -> list:
    # Sweep jobs are numbered: job 10 after job 9, not after job 1.
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.name)]


# ---- the whole evaluation ---------------------------------------------------------------------
def check_settings(unknown: str, batch_size: int, method: str = "windows", precision: str = "32") -> None:
    """Refuse bad eval.* values before anything is loaded."""
    if precision not in PRECISIONS:
        raise NanoLLMError(f"eval.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if method not in METHODS:
        raise NanoLLMError(f"eval.method must be one of {', '.join(METHODS)}, got {method!r}.")
    if unknown not in UNKNOWN_CHOICES:
        raise NanoLLMError(f"eval.unknown must be one of {', '.join(UNKNOWN_CHOICES)}, got {unknown!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise NanoLLMError(f"eval.batch_size must be an integer >= 1, got {batch_size!r}.")


def evaluate(
    ckpt_path: str | list[str],
    data_path: str,
    stride: int | None,
    batch_size: int,
    unknown: str,
    device: str,
    outputs_dir: Path,
    progress: bool = False,
    glob: str = DEFAULT_GLOB,
    method: str = "windows",
    precision: str = "32",
) -> tuple[list[dict], bool]:
    """Score the text at `data_path` with every checkpoint `ckpt_path` names; results sorted by bits per character.

    Everything is loaded and checked (checkpoints, text, stride) before the first, slow, scoring pass.
    Returns the results and whether `ckpt_path` named a collection (then the JSON report is a list).
    """
    check_settings(unknown, batch_size, method, precision)
    keep_freed_memory()  # each batch's tensors reuse the previous batch's memory (allocator.py)
    loaded, several = checkpoint_files(ckpt_path, outputs_dir)
    text = read_text(data_path, glob)
    jobs, encoded = [], {}
    for path, checkpoint in loaded:
        model, tokenizer, _ = model_from_checkpoint(path, checkpoint)
        if tokenizer is None:
            raise NanoLLMError(
                f"Checkpoint '{path}' has no vocabulary (it was trained on raw token ids); it cannot score text."
            )
        if method == "rolling" and model.config.position_encoding != "rope":
            raise NanoLLMError(
                f"Checkpoint '{path}' has learned position embeddings, which cannot roll past the context: "
                "eval.method=rolling needs a RoPE model; use eval.method=windows (generation recomputes its window)."
            )
        key = "".join(tokenizer.chars)  # checkpoints of one run share a vocabulary: encode once
        if key not in encoded:
            encoded[key] = encode_text(tokenizer, text, unknown, data_path)
        jobs.append((path, model, resolve_stride(stride, model.config.context_length), encoded[key]))
    del loaded, checkpoint  # the checkpoints' optimizer states are no longer needed
    results = []
    for path, model, job_stride, (ids, skipped) in jobs:
        # bf16 autocast: ~1.6x faster on a CPU with AVX512-BF16 (BENCHMARKS.md); the loss stays float32.
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=precision == "bf16"):
            if method == "rolling":
                nll_sum, count = rolling_log_likelihood(model.to(device), ids)
            else:
                nll_sum, count = score_tokens(model.to(device), ids, job_stride, batch_size, progress=progress)
        model.cpu()
        results.append(
            {
                "checkpoint": str(path),
                **summarize(nll_sum, count),
                "num_characters": count,
                "skipped_characters": skipped,
                "method": method,
                "precision": precision,
                "stride": job_stride if method == "windows" else None,
                "context_length": model.config.context_length,
                "data_path": str(data_path),
            }
        )
    return sorted(results, key=lambda r: r["bits_per_character"]), several


def pick_device(device: str) -> str:
    """`auto` is the GPU when there is one; asking for a missing GPU is a user error, not a traceback."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(str(device)).type
    except (RuntimeError, TypeError):
        raise NanoLLMError(f"device must be cpu, cuda, cuda:N or auto, got {device!r}.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise NanoLLMError(f"device={device} but no CUDA GPU is available; use device=cpu or device=auto.")
    return str(device)


# ---- reports ----------------------------------------------------------------------------------
def format_table(results: list[dict]) -> str:
    """One row per checkpoint: characters scored, loss (nats), perplexity, bits per character."""
    headers = ["checkpoint", "characters", "loss", "perplexity", "bits/char"]
    rows = [
        [
            r["checkpoint"],
            f"{r['num_characters']:,}",
            f"{r['loss']:.4f}",
            f"{r['perplexity']:.3f}",
            f"{r['bits_per_character']:.4f}",
        ]
        for r in results
    ]
    if any(r["skipped_characters"] for r in results):
        headers.append("skipped")
        for row, r in zip(rows, results, strict=True):
            row.append(f"{r['skipped_characters']:,}")
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [headers, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def check_output_path(path: str | Path) -> None:
    """Refuse an output path that cannot be written, or that exists, before scoring, not after minutes of it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NanoLLMError(f"Cannot create the directory of output='{path}': {err.strerror or err}.") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise NanoLLMError(f"output='{path}' is a directory or not writable; pass output= a writable .json file path.")
    if os.path.lexists(path):  # it may be a checkpoint or the text just scored: never replace a file
        raise NanoLLMError(f"output '{path}' already exists; choose a new file name or delete it first.")
