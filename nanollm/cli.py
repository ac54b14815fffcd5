"""What the entry points do around the library: user errors as one line, run dirs, reports."""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import re
import shutil
import signal
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import nanollm.config  # noqa: F401  (registers the OmegaConf resolvers conf/ uses)
from nanollm.config import outputs_path
from nanollm.errors import NanoLLMError, SweepError, TrainingInterrupted
from nanollm.files import atomic_write_text, remove_unused_run_dir
from nanollm.start import in_multirun

_job_started = False  # set once Hydra has composed the config and the command runs


def exit_on_user_error(
    main=None,
    *,
    interrupted: str = "interrupted before training started; nothing was saved.",
    out_of_memory: str = "use a smaller data.batch_size or a smaller model",
):
    """Print a NanoLLMError as one `error:` line on stderr and exit non-zero, without a traceback.

    In a multirun the failed job is recorded in its results.json instead, so the sweep goes on. Under
    DDP only rank 0 prints. `interrupted` is the line for a Ctrl-C that the command does not handle;
    `out_of_memory` says what to make smaller when an allocation fails.
    """
    if main is None:
        return functools.partial(exit_on_user_error, interrupted=interrupted, out_of_memory=out_of_memory)

    @functools.wraps(main)
    def wrapper(cfg: DictConfig):
        global _job_started
        _job_started = True
        try:
            return main(cfg)
        except NanoLLMError as err:
            return _user_error(cfg, err)
        except (MemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            cause = re.sub(r"^\[enforce fail at [^\]]*\] err == 0\. ", "", str(err).strip().splitlines()[0])
            return _user_error(cfg, NanoLLMError(f"out of memory: {cause}; {out_of_memory}."))
        except KeyboardInterrupt:
            if _run_logged and cfg.get("checkpoint_dir"):  # a second Ctrl-C after training: the first one's save
                # was cut short, but the checkpoints written before it are there to resume from.
                _print_once(f"error: {TrainingInterrupted.again(cfg.checkpoint_dir)}")
            else:
                _print_once(f"error: {interrupted}")
            sys.exit(130)

    return wrapper


def _user_error(cfg: DictConfig, err: NanoLLMError) -> None:
    _print_once(f"error: {err}")
    if in_multirun() and not isinstance(err, (TrainingInterrupted, SweepError)):
        _record_failed_job(cfg, err)
        return None
    sys.exit(err.exit_code)


def is_out_of_memory(err: BaseException) -> bool:
    """An allocation that failed: MemoryError (numpy's too), torch's OutOfMemoryError (a GPU's) or the
    CPU allocator's RuntimeError. The request was too large for this machine, not a bug."""
    torch = sys.modules.get("torch")  # a torch error means torch is imported
    if isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


log = logging.getLogger("nanollm")
# The error line also goes to train.log (Hydra's job logging gives this logger the file); without it, nowhere.
error_log = logging.getLogger("nanollm.errors")
error_log.addHandler(logging.NullHandler())
error_log.propagate = False


_run_logged = False  # this invocation has written to its run's log: a failure afterwards belongs there too


def _log_run(message: str) -> None:
    global _run_logged
    _run_logged = True
    log.info(message)


def _print_once(line: str) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(line, file=sys.stderr, flush=True)
        if _run_logged:  # a run refused at start-up writes nothing into a directory that may be another run's
            error_log.error(line)


def run_entry_point(main) -> None:
    """Run a Hydra entry point, turning Hydra's own errors (an unknown config group choice or key, an
    override it cannot parse) into one `error:` line instead of its multi-line report.

    Hydra raises them, rather than printing, when HYDRA_FULL_ERROR is set; a user who sets it
    explicitly still gets the full traceback.
    """
    full_error_wanted = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except BrokenPipeError:  # `python train.py --help | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except (HydraException, OmegaConfBaseException, OSError) as err:
        hydra_error = isinstance(err, (HydraException, OmegaConfBaseException))
        if full_error_wanted or _job_started or not (hydra_error or err.filename):
            raise  # inside the job it is a bug of ours: keep the traceback
        if hydra_error:
            line = hydra_error_line(err)
        else:  # Hydra creating the run directory
            line = f"cannot create the run directory '{err.filename}': {err.strerror}; choose another hydra.run.dir."
        _print_once(f"error: {line}")
        sys.exit(1)
    except ValueError as err:
        # Optuna's sweeper asks for the best trial even when every trial failed; each printed its error.
        if full_error_wanted or str(err) != "No trials are completed yet.":
            raise
        _print_once(
            "error: no trial of the sweep completed: each failed with the error above (also in its "
            "results.json); fix it and run the sweep again."
        )
        sys.exit(1)
    skip_shutdown_collections()


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def skip_shutdown_collections() -> None:
    """Spare the interpreter's exit its garbage collections over every object still alive.

    Python's shutdown collects garbage again and again while it clears the modules; after Lightning's
    imports (torch._dynamo, sympy, scipy) that took 0.6-0.8 s of every train.py run (BENCHMARKS.md).
    Garbage cycles are collected here first, so their finalizers run as usual; the objects still alive
    are frozen out of later collections. Their memory goes back with the process, and objects outside
    reference cycles are still finalized as the modules are cleared.
    """
    gc.collect()
    gc.freeze()


def hydra_error_line(err: Exception) -> str:
    """One line that says what Hydra or OmegaConf refused and how to fix it."""
    from hydra.errors import MissingConfigException, OverrideParseException

    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, choice = err.missing_cfg_file.rsplit("/", 1)
        options = sorted(err.options or []) or _group_options(err, group)
        listed = f"; choose one of: {', '.join(options)} (e.g. {group}={options[0]})" if options else ""
        return f"unknown {group} '{choice}'{listed}."
    unknown_key = re.match(r"Could not override '([^']+)'", first)
    if unknown_key and "To append to your config use +" in str(err):
        key = unknown_key.group(1)
        return (
            f"unknown config key '{key}'. Check its spelling (python train.py --cfg job lists every key), "
            f"or add a new key with +{key}=..."
        )
    ambiguous = re.match(r"Ambiguous value for argument '([^']+)'", first)
    if ambiguous:  # an unquoted comma: Hydra reads a list or a sweep
        key, _, value = ambiguous.group(1).partition("=")
        return f"the value of '{ambiguous.group(1)}' has a comma: quote it, e.g. '{key}=\"{value}\"'."
    if isinstance(err, OverrideParseException):
        return (
            f"could not parse the override '{err.override}'. Quote values with spaces, commas or special "
            "characters, e.g. 'prompt=\"Hi, you?\"'."
        )
    return first


def _group_options(err: Exception, group: str) -> list[str]:
    """A config group's choices in the search path directories Hydra's message lists: the error of a
    list choice (`logger=[csv,bogus]`) names none itself."""
    directories = re.findall(r"path=file://(\S+)", str(err))
    return sorted({path.stem for directory in directories for path in Path(directory, group).glob("*.yaml")})


def _record_failed_job(cfg: DictConfig, err: Exception) -> None:
    from hydra.core.hydra_config import HydraConfig

    from nanollm.checkpointing import holds_results

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if holds_results(run_dir):
        return  # the results of a run whose directory this job was refused: they stay as they are
    record = {"status": "failed", "error": str(err), "overrides": list(hydra_cfg.overrides.task)}
    atomic_write_text(run_dir / "results.json", json.dumps(record, indent=2) + "\n")


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (GPU/TPU availability, ...) out of the console; we print a summary."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_command(cfg: DictConfig) -> float | None:
    """`python train.py`: train, print the report, return the final validation loss (for sweepers)."""
    from hydra.core.hydra_config import HydraConfig

    from nanollm.config import validate_config

    hydra_cfg = HydraConfig.get()
    try:
        validate_config(cfg)  # before the heavy imports, so config mistakes fail in a second
        from nanollm.distributed import check_multirun_can_launch, share_machine_among_parallel_jobs
        from nanollm.start import explicit_keys
        from nanollm.training import run

        quiet_lightning()
        if in_multirun():
            check_multirun_can_launch(cfg.trainer)
            if "joblib" in str(hydra_cfg.launcher.get("_target_", "")).lower():
                share_machine_among_parallel_jobs(cfg.trainer, hydra_cfg.launcher, hydra_cfg.job.num)
        if cfg.run_dir is None:
            cfg.run_dir = hydra_cfg.runtime.output_dir
        results = run(cfg, echo=_log_run, explicit=explicit_keys(hydra_cfg.overrides.task))
    except (NanoLLMError, KeyboardInterrupt) as err:
        if not _run_logged:
            _discard_unstarted_run_dir(hydra_cfg, sweep_refused=isinstance(err, SweepError))
        raise
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:  # under DDP every process returns here; one report is enough
        log.info(format_report(results))
    if results["status"] == "interrupted":
        # 128 + the signal number, as a shell reports a process ended by that signal (130 Ctrl-C, 143 SIGTERM).
        signum = signal.Signals[results["stopped_by"]]
        cause = "interrupted" if signum == signal.SIGINT else f"stopped by {signum.name}"
        raise TrainingInterrupted(
            f"{cause} at step {results['global_step']}; saved {results['checkpoint_path']}. "
            f"Resume with the same command plus {_resume_overrides(hydra_cfg)}.",
            exit_code=128 + signum,
        )
    return results["final_val_loss"]


def _discard_unstarted_run_dir(hydra_cfg, sweep_refused: bool = False) -> None:
    """A run stopped before it started (a bad input) leaves no directory: the one claimed for it holds only
    its config snapshot and empty directories. Never a directory the user named (hydra.run.dir), which
    may be another run's, nor a sweep job's, which records the failure, unless the whole sweep was refused
    (SweepError): then its job directory goes, and the sweep directory if Hydra's multirun.yaml is all
    that is left in it."""
    if not in_multirun() and not _set_on_command_line(hydra_cfg, "hydra.run.dir"):
        run_dir = Path(hydra_cfg.runtime.output_dir)
        remove_unused_run_dir(run_dir)
        _remove_if_empty(run_dir.parent)  # outputs/<date>/, if this was its only run
        _remove_if_empty(run_dir.parent.parent)  # and outputs/ itself, if it was the first
    elif sweep_refused and not _set_on_command_line(hydra_cfg, "hydra.sweep.dir"):
        remove_unused_run_dir(Path(hydra_cfg.runtime.output_dir))
        sweep_dir = Path(hydra_cfg.sweep.dir)
        if sweep_dir.is_dir() and all(p.name == "multirun.yaml" for p in sweep_dir.iterdir()):
            shutil.rmtree(sweep_dir, ignore_errors=True)
            _remove_if_empty(sweep_dir.parent)  # outputs/multirun/<date>/
            _remove_if_empty(sweep_dir.parent.parent)  # outputs/multirun/


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:  # not empty (other runs), or already gone
        pass


def _set_on_command_line(hydra_cfg, key: str) -> bool:
    return any(o.startswith(f"{key}=") for o in hydra_cfg.overrides.hydra)


def _resume_overrides(hydra_cfg) -> str:
    """What to add to the command to continue it: a sweep must also be pointed at its own directory,
    where each job continues from its own checkpoint (jobs that never started start then)."""
    if not in_multirun() or _set_on_command_line(hydra_cfg, "hydra.sweep.dir"):
        return "ckpt_path=last"
    return f"ckpt_path=last hydra.sweep.dir={hydra_cfg.sweep.dir}"


def format_report(results: dict) -> str:
    def num(value, fmt=".4f"):
        return "n/a" if value is None else format(value, fmt)

    lines = [
        f"final train loss      {num(results['final_train_loss'])}",
        f"final val loss        {num(results['final_val_loss'])}  (perplexity {num(results['final_val_perplexity'], '.2f')})",
        f"final gradient norm   {num(results['final_grad_norm'])}",
        f"steps                 {results['global_step']}  in {results['training_time_seconds']:.1f} s",
        f"checkpoint            {results['checkpoint_path']}",
    ]
    if results.get("sample"):
        lines += ["", "sample:", results["sample"]]
    return "\n".join(lines)


def generate_command(cfg: DictConfig) -> None:
    """`python generate.py`: load a checkpoint alone and print samples (one sample streams as it is made)."""
    import torch

    from nanollm.checkpointing import model_from_checkpoint, resolve_checkpoint
    from nanollm.config import validate_generate_config
    from nanollm.generation import generate_batch, generate_tokens, make_generator

    validate_generate_config(cfg)
    # Warnings (a damaged checkpoint passed over) go to stderr: stdout is the sampled text.
    path, checkpoint = resolve_checkpoint(str(cfg.ckpt_path), None, outputs_path(cfg), warn=_to_stderr)
    device = (
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    model, tokenizer, _ = model_from_checkpoint(path, checkpoint)
    if tokenizer is None:
        raise NanoLLMError(
            f"Checkpoint '{path}' has no vocabulary (it was trained on raw token ids); decode its ids yourself."
        )
    model.to(device)
    prompt_ids = tokenizer.encode(str(cfg.prompt), what="The prompt")
    settings = (float(cfg.temperature), cfg.top_k, make_generator(cfg.seed), cfg.use_cache, cfg.beyond_context)
    if cfg.num_samples == 1:
        sys.stdout.write(str(cfg.prompt))
        for token in generate_tokens(model, prompt_ids, cfg.max_new_tokens, *settings):
            sys.stdout.write(tokenizer.chars[token])
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    # Several samples advance together, one batched pass per character.
    for index, ids in enumerate(generate_batch(model, prompt_ids, cfg.num_samples, cfg.max_new_tokens, *settings)):
        print(f"--- sample {index + 1} ---")
        print(str(cfg.prompt) + tokenizer.decode(ids))


def eval_command(cfg: DictConfig) -> None:
    """`python eval.py`: score text with one or more checkpoints, print a table, optionally write JSON."""
    from nanollm.evaluation import check_output_path, evaluate, format_table, pick_device

    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise NanoLLMError(
            "ckpt_path is required: python eval.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt (or ckpt_path=last)."
        )
    ckpt_path = OmegaConf.to_container(cfg.ckpt_path) if OmegaConf.is_list(cfg.ckpt_path) else str(cfg.ckpt_path)
    if not cfg.data.path:  # Path("") is the current directory: every text file under it would be scored
        raise NanoLLMError("data.path is empty: pass data.path=/path/to/text.txt.")
    if cfg.output:
        check_output_path(cfg.output)
    results, several = evaluate(
        ckpt_path,
        str(cfg.data.path),
        cfg.eval.stride,
        cfg.eval.batch_size,
        cfg.eval.unknown,
        pick_device(cfg.device),
        outputs_path(cfg),
        progress=True,
        glob=cfg.data.get("glob") or "**/*.txt",
        method=cfg.eval.get("method") or "windows",
        precision=str(cfg.eval.get("precision") or "32"),
    )
    print(format_table(results))
    if cfg.output:
        report = results if several else results[0]
        # Checked before scoring, and again here: a file that appeared meanwhile is not replaced.
        atomic_write_text(Path(cfg.output), json.dumps(report, indent=2) + "\n", what="scores", replace=False)
        print(f"wrote {cfg.output}")
