"""Benchmarks: `python -m nanollm.bench [--data PATH] [--out FILE]`.

Everything is measured side by side in one invocation, interleaved, so machine noise cancels:
- whole processes, start to exit: the reference recipe in a bare loop as nanoGPT's train.py runs it
  (the yardstick), train.py on that recipe with its defaults, and experiment=speedrun_cpu;
- training ms/step with the exact GELU against GPT-2's tanh form (model.activation);
- training tokens/s and ms/step of the Lightning path (`nanollm.training.run`, as train.py runs it)
  against the bare loop with the same model, batches, optimizer, schedule and clipping, and that both
  reach the same validation loss; model FLOPs utilisation against a measured matmul peak;
- characters scored per second by the validation pass and eval.py (medium preset), with glibc's malloc
  defaults and with freed memory kept;
- generation characters/s: long texts past the context, and with and without the KV cache;
- corpus preparation MB/s and peak memory, a repeated start on a large corpus, and the time from
  `python train.py` to the first optimizer step.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from nanollm.bare import REFERENCE, bare_loop
from nanollm.training import VAL_BATCH_TOKENS

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "raw" / "sample.txt"


def compose(preset: str, values: dict, run_dir: Path, data: Path):
    from omegaconf import OmegaConf

    from nanollm.api import compose_config

    cfg = compose_config([f"model={preset}", "trainer.enable_progress_bar=false"])
    values = {
        "data.path": str(data),
        "data.cache_dir": str(run_dir.parent / "cache"),
        "run_dir": str(run_dir),
        "checkpoint_dir": str(run_dir / "checkpoints"),
        "sample.max_new_tokens": 0,
        **values,
    }
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


class StepTimer(L.Callback):
    """Wall-clock between the end of step `start` (or the start of training) and the end of the last step."""

    def __init__(self, start: int):
        self.start = start
        self.t0 = self.t1 = None

    def on_train_start(self, trainer, *args) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.start:
            self.t0 = time.perf_counter()
        self.t1 = time.perf_counter()


def lightning_run(cfg, warmup: int) -> dict:
    """Train through nanollm.training.run (the train.py path) and time the steady-state steps."""
    from nanollm.training import run

    timer = StepTimer(warmup)
    started = time.perf_counter()
    results = run(cfg, callbacks=[timer], echo=lambda *_: None)
    total = time.perf_counter() - started
    steps = cfg.trainer.max_steps - warmup
    return {
        "seconds": timer.t1 - timer.t0,
        "steps": steps,
        "total_seconds": total,
        "val_loss": results["final_val_loss"],
    }


def matmul_peak(size: int = 1024, repeats: int = 20) -> float:
    """Measured float32 matrix-multiply FLOP/s of this machine (best of several runs)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def throughput_rows(data: Path, work: Path, presets: list[str], steps: int, rounds: int) -> list[dict]:
    from nanollm.config import model_config_from
    from nanollm.model import TransformerLanguageModel

    peak = matmul_peak()
    rows = []
    for name in [*presets, "reference"]:
        values = dict(REFERENCE) if name == "reference" else {}
        # medium's steps are ~50x nano's; fewer of them give the same measurement time.
        config_steps = max(60, steps // 5) if name == "medium" else steps
        values.update(
            {"trainer.max_steps": config_steps, "trainer.val_check_interval": 10**9, "checkpoint_interval": 10**9}
        )
        warmup = min(20, config_steps // 5)
        best = {"lightning": None, "bare": None}
        for r in range(rounds):  # interleaved so drifts in machine speed hit both alike
            for kind in ("bare", "lightning"):
                cfg = compose("nano" if name == "reference" else name, values, work / f"{name}-{kind}-{r}", data)
                result = bare_loop(cfg, warmup, fused=cfg.optim.fused) if kind == "bare" else lightning_run(cfg, warmup)
                if best[kind] is None or result["seconds"] < best[kind]["seconds"]:
                    best[kind] = result
        tokens_per_step = cfg.data.batch_size * cfg.model.context_length
        from nanollm.corpus import prepare_corpus

        vocab = prepare_corpus(cfg.data.path, cfg.data.cache_dir).tokenizer.vocab_size
        model = TransformerLanguageModel(model_config_from(cfg, vocab_size=vocab))
        row = {"config": name, "parameters": model.num_parameters(), "tokens_per_step": tokens_per_step}
        for kind in ("lightning", "bare"):
            seconds_per_step = best[kind]["seconds"] / best[kind]["steps"]
            row[f"{kind}_tokens_per_s"] = tokens_per_step / seconds_per_step
            row[f"{kind}_ms_per_step"] = 1000 * seconds_per_step
        row["ratio"] = row["lightning_tokens_per_s"] / row["bare_tokens_per_s"]
        row["mfu"] = model.flops_per_token() * row["lightning_tokens_per_s"] / peak
        row["peak_gflops"] = peak / 1e9
        rows.append(row)
    return rows


def reference_quality(data: Path, work: Path, steps: int, rounds: int = 2) -> dict:
    """The reference config for its full 2000 steps, Lightning path against the bare loop, with validation.

    Whole runs alternate (bare first in even rounds, Lightning first in odd ones) and the fastest of
    each is kept: a single pair of minute-long runs on a shared machine differs by up to ~10% from noise.
    """
    interval = max(steps // 4, 1)
    values = dict(
        REFERENCE,
        **{"trainer.max_steps": steps, "trainer.val_check_interval": interval, "checkpoint_interval": interval},
    )
    runs = {"bare": [], "lightning": []}
    for r in range(rounds):
        for kind in ("bare", "lightning") if r % 2 == 0 else ("lightning", "bare"):
            cfg = compose("nano", values, work / f"ref-{kind}-{r}", data)
            result = (
                bare_loop(cfg, warmup=0, evaluate=True, fused=cfg.optim.fused)
                if kind == "bare"
                else lightning_run(cfg, warmup=0)
            )
            runs[kind].append(result)
    best = {kind: min(results, key=lambda x: x["total_seconds"]) for kind, results in runs.items()}
    every = {kind: [x["total_seconds"] for x in results] for kind, results in runs.items()}
    return {**best, "steps": steps, "rounds": rounds, "every_run_seconds": every}


def whole_process_runs(data: Path, work: Path, rounds: int, steps: int = 2000) -> dict:
    """Whole processes, timed from start to exit, in alternating order: the yardstick (the bare loop,
    as nanoGPT's train.py runs the reference recipe), train.py on the same recipe with its defaults,
    and train.py experiment=speedrun_cpu. Each round runs all three; every run is kept."""
    from nanollm.corpus import prepare_corpus

    cache = work / "whole-cache"
    prepare_corpus(data, cache)  # encoded once beforehand: no run pays for it
    recipe = [f"{key}={value}" for key, value in REFERENCE.items() if key != "model.name"]
    common = [f"data.path={data}", f"data.cache_dir={cache}", "trainer.enable_progress_bar=false"]
    commands = {
        "bare": [
            sys.executable,
            "-m",
            "nanollm.bare",
            "--data",
            str(data),
            "--cache-dir",
            str(cache),
            "--steps",
            str(steps),
        ],
        "train.py": [sys.executable, "train.py", *recipe, f"trainer.max_steps={steps}", *common],
        "speedrun": [sys.executable, "train.py", "experiment=speedrun_cpu", *common],
    }
    runs = {name: [] for name in commands}
    for r in range(rounds):
        for name in list(commands) if r % 2 == 0 else list(reversed(commands)):
            run_dir = work / f"whole-{name}-{r}"
            command = commands[name] + ([] if name == "bare" else [f"hydra.run.dir={run_dir}"])
            started = time.time()
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
            ended = time.time()
            if name == "bare":  # its full validation pass after training is for the report only: not timed
                info = json.loads(done.stdout.strip().splitlines()[-1])
                runs[name].append({"seconds": info["trained_until_unix_time"] - started, "val_loss": info["val_loss"]})
            else:
                results = json.loads((run_dir / "results.json").read_text())
                runs[name].append({"seconds": ended - started, "val_loss": results["final_val_loss"]})
    return {"steps": steps, "rounds": rounds, "runs": runs}


def evaluation_speed(data: Path, rounds: int = 5) -> dict:
    """Characters scored per second for the medium preset on 200,000 characters of `data`: the validation
    pass as it was (batch 32), the validation pass now (batches of about VAL_BATCH_TOKENS tokens), and
    eval.py's sliding windows. Each round runs in two fresh processes, one with glibc's malloc defaults
    and one with freed memory kept (allocator.py), as train.py and eval.py run: a process's earlier
    allocations would change the first. Every round is kept: with glibc's defaults the speed varies
    from one process to the next, so the table reports medians, not the best round."""
    import multiprocessing

    every: dict[str, dict[str, list[float]]] = {"glibc defaults": {}, "freed memory kept": {}}
    # A new process per task: the malloc setting cannot be undone within one.
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for _ in range(rounds):  # interleaved, so a change in the machine's speed hits every path alike
            for setting, keep in (("glibc defaults", False), ("freed memory kept", True)):
                for name, speed in pool.apply(scoring_round, (data, keep)).items():
                    every[setting].setdefault(name, []).append(speed)
    return every


def scoring_round(data: Path, keep_memory: bool) -> dict[str, float]:
    """One round of evaluation_speed's paths in this process: characters per second for each."""
    from nanollm.allocator import keep_freed_memory
    from nanollm.api import compose_config
    from nanollm.config import model_config_from
    from nanollm.evaluation import score_tokens
    from nanollm.model import TransformerLanguageModel
    from nanollm.tokenizer import CharTokenizer
    from nanollm.windows import SequentialWindows

    if keep_memory and not keep_freed_memory():
        raise RuntimeError("freed memory cannot be kept here (glibc only, no MALLOC_* variables)")
    text = data.read_text(encoding="utf-8")[:200_000]
    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode_array(text)
    cfg = compose_config(["model=medium"])
    torch.manual_seed(0)
    model = TransformerLanguageModel(model_config_from(cfg, tokenizer.vocab_size)).eval()
    context = model.config.context_length

    def validation(batch_size: int, bf16: bool = False) -> int:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            for x, y in SequentialWindows(ids, context, batch_size):
                model(x, y)
        return (len(ids) - 1) // context * context

    def evaluation(bf16: bool = False) -> int:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return score_tokens(model, ids, None, 32)[1]

    paths = {
        "validation pass as it was (batch 32)": lambda: validation(32),
        f"validation pass now (batch {VAL_BATCH_TOKENS // context})": lambda: validation(VAL_BATCH_TOKENS // context),
        "validation pass, bf16 autocast (trainer.precision=bf16-mixed)": lambda: validation(
            VAL_BATCH_TOKENS // context, True
        ),
        f"eval.py (stride {context // 2}: every character scored with >= {context // 2} before it)": evaluation,
        "eval.py, bf16 autocast (eval.precision=bf16)": lambda: evaluation(True),
    }
    return rates_of(paths)


def rates_of(paths: dict) -> dict[str, float]:
    """Run each path once, in order: what it returns (characters) per second of its wall-clock."""
    rates = {}
    for name, path in paths.items():
        started = time.perf_counter()
        count = path()
        rates[name] = count / (time.perf_counter() - started)
    return rates


def activation_step_times(data: Path, work: Path, presets: list[str], steps: int = 30, rounds: int = 3) -> list[dict]:
    """ms per training step (forward, backward, fused AdamW) with the exact GELU (model.activation=gelu)
    and GPT-2's tanh form (gelu_tanh), interleaved, best of `rounds`, on batches of `data`."""
    from nanollm.config import model_config_from
    from nanollm.corpus import prepare_corpus
    from nanollm.model import TransformerLanguageModel
    from nanollm.optim import build_optimizer
    from nanollm.windows import RandomWindows

    rows = []
    corpus = prepare_corpus(data, work / "activation-cache")
    for name in [*presets, "reference"]:
        values = dict(REFERENCE) if name == "reference" else {}
        cfg = compose("nano" if name == "reference" else name, values, work / "activation", data)
        x, y = RandomWindows(corpus.tokens, cfg.model.context_length, cfg.data.batch_size, 0, 0, 0).batch(0)
        best = {}
        for _ in range(rounds):
            for activation in ("gelu_tanh", "gelu"):
                torch.manual_seed(0)
                config = model_config_from(cfg, vocab_size=corpus.tokenizer.vocab_size)
                model = TransformerLanguageModel(dataclasses.replace(config, activation=activation, dropout=0.0))
                optimizer, _ = build_optimizer(model, cfg.optim, steps + 1, fused=True)
                for step in range(steps + 1):
                    if step == 1:  # the first step allocates; time the rest
                        started = time.perf_counter()
                    _, loss = model(x, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                ms = 1000 * (time.perf_counter() - started) / steps
                best[activation] = min(best.get(activation, math.inf), ms)
        rows.append({"config": name, **best, "ratio": best["gelu"] / best["gelu_tanh"]})
    return rows


def long_generation(characters: int = 2000, samples: int = 8, rounds: int = 3) -> dict:
    """Characters per second sampling `characters` from an untrained nano model (context 64): recomputing
    the window past the context (the exact path, as before), rolling the KV cache, and `samples` at once."""
    from nanollm.generation import generate_batch, generate_tokens, make_generator
    from nanollm.model import ModelConfig, TransformerLanguageModel

    torch.manual_seed(0)
    model = TransformerLanguageModel(ModelConfig(65, 32, 2, 4, 64, context_length=64)).eval()
    paths = {
        "recompute (exact; the only path before)": lambda: len(
            list(generate_tokens(model, [0], characters, 0.8, 40, make_generator(0), True, "recompute"))
        ),
        "rolling KV cache": lambda: len(
            list(generate_tokens(model, [0], characters, 0.8, 40, make_generator(0), True, "rolling"))
        ),
        f"rolling, {samples} samples in one batch": lambda: (
            samples
            * len(generate_batch(model, [0], samples, characters, 1.0, 40, make_generator(0), True, "rolling")[0])
        ),
    }
    every: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):  # interleaved, so a change in the machine's speed hits every path alike
        for name, rate in rates_of(paths).items():
            every[name].append(rate)
    return every


def generation_speed(preset: str = "medium", context: int = 256, new_tokens: int = 255, rounds: int = 3) -> dict:
    from nanollm.generation import generate_tokens, make_generator
    from nanollm.model import ModelConfig, TransformerLanguageModel

    sizes = {"medium": (128, 6, 4, 256)}[preset]
    config = ModelConfig(65, *sizes, context_length=context)
    model = TransformerLanguageModel(config).eval()
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):  # interleaved, like the training measurements, so load changes hit both paths
        for use_cache in (False, True):
            start = time.perf_counter()
            tokens = list(generate_tokens(model, [0], new_tokens, 1.0, None, make_generator(0), use_cache))
            rates[use_cache].append(len(tokens) / (time.perf_counter() - start))
    speedups = [cache / none for cache, none in zip(rates[True], rates[False], strict=True)]
    return {"cache": rates[True], "no_cache": rates[False], "speedup": speedups, "tokens": new_tokens}


def make_corpus(path: Path, megabytes: int) -> None:
    """A corpus of `megabytes` MB built from shuffled lines of the sample (realistic character mix)."""
    lines = SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)
    rng = np.random.default_rng(0)
    with open(path, "w", encoding="utf-8") as handle:
        written = 0
        while written < megabytes * 1_000_000:
            block = "".join(lines[i] for i in rng.integers(0, len(lines), 2000))
            handle.write(block)
            written += len(block.encode("utf-8"))


def data_preparation(work: Path, megabytes: int) -> dict:
    corpus = work / "corpus.txt"
    make_corpus(corpus, megabytes)
    size = corpus.stat().st_size
    code = (
        "import time,resource,sys; from nanollm.corpus import prepare_corpus; t=time.perf_counter();"
        f"c=prepare_corpus({str(corpus)!r}, {str(work / 'prep-cache')!r}); print(time.perf_counter()-t, len(c.tokens),"
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.split()
    seconds, tokens, peak_kb = float(out[0]), int(out[1]), int(out[2])
    return {
        "megabytes": size / 1e6,
        "seconds": seconds,
        "mb_per_s": size / 1e6 / seconds,
        "peak_mb": peak_kb / 1024,
        "tokens": tokens,
    }


def one_step_command(run_dir: Path, *overrides: str) -> list[str]:
    """`python train.py` for one optimizer step and no sample: what a start costs, up to the first step."""
    return [
        sys.executable,
        str(ROOT / "train.py"),
        f"hydra.run.dir={run_dir}",
        "trainer.max_steps=1",
        "sample.max_new_tokens=0",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]


def seconds_to_first_step(run_dir: Path, started_unix_time: float) -> float:
    return json.loads((run_dir / "results.json").read_text())["first_step_unix_time"] - started_unix_time


def time_to_first_step(work: Path) -> float:
    run_dir = work / "first-step"
    start = time.time()
    subprocess.run(
        one_step_command(run_dir, f"data.cache_dir={work / 'cache'}"), cwd=ROOT, check=True, capture_output=True
    )
    return seconds_to_first_step(run_dir, start)


def large_corpus_start(work: Path, gigabytes: float) -> dict:
    """First preparation of a generated directory corpus, then a second train.py start: time to first step, peak memory.

    The second start should stat the files and map the cached encoding, not read the corpus.
    """
    from nanollm.corpus import SETTLE_NS, prepare_corpus

    corpus, cache, run_dir = work / "large-corpus", work / "large-corpus-cache", work / "large-corpus-run"
    corpus.mkdir()
    make_corpus(corpus / "part-0000.txt", max(1, min(64, round(gigabytes * 1000))))
    base = (corpus / "part-0000.txt").read_bytes()
    view = memoryview(base)  # slices without copies
    rng = np.random.default_rng(1)
    for i in range(1, max(1, round(gigabytes * 1e9 / len(base)))):
        # The first file rotated at a random line start: distinct text, written at disk speed.
        cut = base.index(b"\n", int(rng.integers(0, len(base) // 2))) + 1
        with open(corpus / f"part-{i:04d}.txt", "wb") as handle:
            handle.write(view[cut:])
            handle.write(view[:cut])
    files = sorted(corpus.iterdir())
    time.sleep(SETTLE_NS / 1e9 + 0.1)  # files this new are re-hashed on the next start; a real corpus is older
    started = time.perf_counter()
    tokens = len(prepare_corpus(corpus, cache).tokens)
    first_seconds = time.perf_counter() - started
    # trainer.limit_val_batches: the final validation would otherwise cover 10% of the corpus.
    command = one_step_command(run_dir, f"data.path={corpus}", f"data.cache_dir={cache}", "trainer.limit_val_batches=2")
    log = work / "large-corpus-run.log"
    start = time.time()
    with open(log, "wb") as output:
        child = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
        peak_kb = peak_memory_kb(child)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, command, log.read_text())
    return {
        "gigabytes": sum(f.stat().st_size for f in files) / 1e9,
        "files": len(files),
        "tokens": tokens,
        "first_prepare_seconds": first_seconds,
        "second_start_seconds": seconds_to_first_step(run_dir, start),
        "second_start_peak_mb": peak_kb / 1024,
    }


def peak_memory_kb(child: subprocess.Popen) -> int:
    """The child's peak resident memory, polled from /proc until it exits.

    Not its rusage: a forked child's ru_maxrss counts the parent's memory at the fork (here, the corpus
    the benchmark itself just prepared), before the child's own program even started.
    """
    peak = 0
    while child.poll() is None:
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
            peak = max(peak, int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]))
        except (OSError, StopIteration):
            pass  # exiting
        time.sleep(0.05)
    return peak


def markdown_table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(map(str, r)) + " |" for r in rows),
    ]


def whole_process_summary(whole: dict) -> dict:
    """Medians and ratios to the yardstick (the bare loop): each round's own ratio, and the median of those."""
    runs = whole["runs"]
    median = {name: statistics.median(r["seconds"] for r in results) for name, results in runs.items()}
    ratios = {
        name: [r["seconds"] / bare["seconds"] for r, bare in zip(runs[name], runs["bare"], strict=True)]
        for name in runs
        if name != "bare"
    }
    return {"median": median, "ratios": ratios, "median_ratio": {n: statistics.median(r) for n, r in ratios.items()}}


def median_and_rounds(values: list[float], style: str = ",.0f", suffix: str = "") -> str:
    """A table cell: the median, then every round in order (a machine's speed drifts; the best round hides it)."""
    every = ", ".join(f"{v:{style}}{suffix}" for v in values)
    return f"{statistics.median(values):{style}}{suffix} ({every})"


def scoring_table(evaluation: dict[str, dict[str, list[float]]]) -> list[str]:
    """evaluation_speed's figures: one row per path, the median and every round per malloc setting, and
    the ratio of the medians."""
    default, kept = evaluation["glibc defaults"], evaluation["freed memory kept"]
    return [
        "",
        "### Scoring text: medium preset, 200,000 characters (interleaved rounds, each in a fresh process)",
        "",
        *markdown_table(
            (
                "path",
                "characters/s, glibc's malloc defaults: median (each round)",
                "characters/s, freed memory kept: median (each round)",
                "kept / defaults (medians)",
            ),
            [
                (
                    name,
                    median_and_rounds(default[name]),
                    median_and_rounds(kept[name]),
                    f"{statistics.median(kept[name]) / statistics.median(default[name]):.2f}",
                )
                for name in kept
            ],
        ),
    ]


def long_generation_rows(every: dict[str, list[float]]) -> list[tuple[str, str, str]]:
    """long_generation's paths: characters/s, and each round's ratio to that round's first path (recompute)."""
    recompute = next(iter(every.values()))
    return [
        (
            name,
            median_and_rounds(rates),
            median_and_rounds([r / b for r, b in zip(rates, recompute, strict=True)], ".1f", "x"),
        )
        for name, rates in every.items()
    ]


def markdown(report: dict) -> str:
    lines = [f"Measured {report['date']} on {report['machine']} with `{report['command']}`."]
    if report.get("whole"):
        whole, summary = report["whole"], whole_process_summary(report["whole"])
        rows = []
        for name, label in (
            ("bare", "bare loop: the reference recipe as nanoGPT's train.py runs it (the yardstick)"),
            ("train.py", "train.py, the same recipe with its defaults"),
            ("speedrun", "train.py experiment=speedrun_cpu"),
        ):
            results = whole["runs"][name]
            every = ", ".join(f"{r['seconds']:.1f}" for r in results)
            vals = ", ".join(f"{r['val_loss']:.4f}" for r in results)
            ratio = (
                "1"
                if name == "bare"
                else f"{summary['median_ratio'][name]:.3f} ({', '.join(f'{x:.3f}' for x in summary['ratios'][name])})"
            )
            rows.append((label, f"{summary['median'][name]:.1f}", every, ratio, vals))
        lines += [
            "",
            f"### Whole processes, start to exit ({whole['rounds']} alternating rounds; ratios per round to the bare loop)",
            "",
            *markdown_table(
                ("run", "median (s)", "every run (s)", "median ratio (each round)", "final val loss (full pass)"), rows
            ),
        ]
    lines += [
        "",
        "### Training throughput: Lightning path vs bare PyTorch loop (same process, interleaved, best of "
        f"{report['rounds']})",
        "",
        *markdown_table(
            ("config", "parameters", "tokens/step", "Lightning tokens/s", "bare tokens/s", "Lightning ms/step",
             "bare ms/step", "ratio", "MFU"),
            [
                (r["config"], f"{r['parameters']:,}", r["tokens_per_step"], f"{r['lightning_tokens_per_s']:,.0f}",
                 f"{r['bare_tokens_per_s']:,.0f}", f"{r['lightning_ms_per_step']:.2f}", f"{r['bare_ms_per_step']:.2f}",
                 f"{r['ratio']:.3f}", f"{100 * r['mfu']:.1f}%")
                for r in report["throughput"]
            ],
        ),
        "",
        f"Both paths use the same optimizer (fused AdamW, train.py's default). MFU is against a measured "
        f"float32 matmul peak of {report['throughput'][0]['peak_gflops']:.0f} GFLOP/s.",
    ]  # fmt: skip
    if report.get("activation"):
        lines += [
            "",
            "### Feed-forward activation: ms per training step (forward, backward, fused AdamW; interleaved, best "
            f"of {report['rounds']})",
            "",
            *markdown_table(
                ("config", "gelu_tanh (GPT-2's tanh form, before)", "gelu (exact, now)", "ratio"),
                [
                    (r["config"], f"{r['gelu_tanh']:.2f}", f"{r['gelu']:.2f}", f"{r['ratio']:.3f}")
                    for r in report["activation"]
                ],
            ),
        ]
    if report.get("reference"):
        ref = report["reference"]
        lines += [
            "",
            f"### The same training on both paths: reference recipe, {ref['steps']} steps, validation every "
            f"{ref['steps'] // 4} steps (in one process)",
            "",
            *markdown_table(
                ("path", "final val loss", "wall-clock (s), every run"),
                [
                    (
                        label,
                        f"{ref[kind]['val_loss']:.4f}",
                        ", ".join(f"{x:.1f}" for x in ref["every_run_seconds"][kind]),
                    )
                    for kind, label in (("lightning", "Lightning (train.py path)"), ("bare", "bare loop"))
                ],
            ),
        ]
    if report.get("evaluation"):
        lines += scoring_table(report["evaluation"])
    if report.get("long_generation"):
        lines += [
            "",
            f"### Long generation: {report['long_generation_characters']:,} characters from nano (context 64), "
            "generate.py's sampling settings (interleaved rounds)",
            "",
            *markdown_table(
                ("path", "characters/s: median (each round)", "against recompute: median (each round)"),
                long_generation_rows(report["long_generation"]),
            ),
        ]
    gen = report["generation"]
    lines += [
        "",
        f"### KV cache (medium preset at a 256-character context, {gen['tokens']} new characters from a 1-character prompt)",
        "",
        *markdown_table(
            ("path", "characters/s: median (each round)"),
            [
                ("KV cache", median_and_rounds(gen["cache"])),
                ("no cache", median_and_rounds(gen["no_cache"])),
                ("speed-up", median_and_rounds(gen["speedup"], ".1f", "x")),
            ],
        ),
    ]
    if report.get("data"):
        d = report["data"]
        lines += [
            "",
            f"### Data preparation ({d['megabytes']:.0f} MB generated corpus: vocabulary + encoding + cache)",
            "",
            f"{d['mb_per_s']:.0f} MB/s ({d['seconds']:.1f} s), peak memory {d['peak_mb']:.0f} MB.",
        ]
    if "first_step_seconds" in report:
        lines += [
            "",
            f"### Time to first step\n\n`python train.py` (nano) to the end of its first optimizer step: {report['first_step_seconds']:.2f} s.",
        ]
    if report.get("large_corpus"):
        big = report["large_corpus"]
        lines += [
            "",
            f"### Repeated start on a large corpus ({big['gigabytes']:.2f} GB in {big['files']} files, {big['tokens']:,} tokens)",
            "",
            f"First preparation (hash, vocabulary, encoding): {big['first_prepare_seconds']:.1f} s. A second `python train.py` "
            f"on it: first optimizer step after {big['second_start_seconds']:.2f} s, peak memory {big['second_start_peak_mb']:.0f} MB.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SAMPLE, help="text to train on (e.g. tinyshakespeare)")
    parser.add_argument("--steps", type=int, default=300, help="steps per throughput measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per path (best is kept)")
    parser.add_argument("--presets", default="nano,small,medium")
    parser.add_argument("--corpus-mb", type=int, default=200, help="size of the generated corpus (0 skips)")
    parser.add_argument("--large-corpus-gb", type=float, default=0, help="GB of a generated corpus (0 skips)")
    parser.add_argument("--whole-rounds", type=int, default=2, help="rounds of whole-process runs (0 skips)")
    parser.add_argument("--whole-steps", type=int, default=2000, help="steps of the whole-process reference runs")
    parser.add_argument("--reference-steps", type=int, default=300, help="steps of the in-process equality check")
    parser.add_argument("--reference-rounds", type=int, default=1, help="runs per path of the equality check (0 skips)")
    parser.add_argument("--activation-steps", type=int, default=30, help="steps per activation measurement (0 skips)")
    parser.add_argument("--gen-tokens", type=int, default=255, help="characters generated per KV-cache measurement")
    parser.add_argument("--long-gen", type=int, default=2000, help="characters of the long-generation measurement")
    parser.add_argument("--gen-rounds", type=int, default=5, help="rounds of the generation measurements (medians)")
    parser.add_argument("--scoring-rounds", type=int, default=5, help="rounds of the scoring measurement (medians)")
    parser.add_argument("--skip-scoring", action="store_true", help="skip the scoring-throughput measurement")
    parser.add_argument("--skip-first-step", action="store_true", help="skip the time-to-first-step measurement")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    from nanollm.cli import quiet_lightning

    quiet_lightning()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
            "command": "python -m nanollm.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "rounds": args.rounds,
        }
        if args.whole_rounds:
            report["whole"] = whole_process_runs(args.data, work, args.whole_rounds, args.whole_steps)
        report["throughput"] = throughput_rows(args.data, work, args.presets.split(","), args.steps, args.rounds)
        if args.activation_steps:
            presets = args.presets.split(",")
            report["activation"] = activation_step_times(args.data, work, presets, args.activation_steps, args.rounds)
        if args.reference_rounds:
            report["reference"] = reference_quality(args.data, work, args.reference_steps, args.reference_rounds)
        if not args.skip_scoring:
            report["evaluation"] = evaluation_speed(args.data, rounds=args.scoring_rounds)
        report["long_generation"] = long_generation(args.long_gen, rounds=args.gen_rounds)
        report["long_generation_characters"] = args.long_gen
        report["generation"] = generation_speed(new_tokens=args.gen_tokens, rounds=args.gen_rounds)
        if not args.skip_first_step:
            report["first_step_seconds"] = time_to_first_step(work)
        if args.corpus_mb:
            report["data"] = data_preparation(work, args.corpus_mb)
        if args.large_corpus_gb:
            report["large_corpus"] = large_corpus_start(work, args.large_corpus_gb)
    text = markdown(report)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
