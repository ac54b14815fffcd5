"""Start-up checks of a composed config: every bad value fails before training, naming its key."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nanollm.errors import NanoLLMError
from nanollm.generation import BEYOND_CONTEXT
from nanollm.model import ModelConfig
from nanollm.optim import OPTIMIZERS

MODEL_KEYS = (
    "embedding_dim",
    "num_layers",
    "num_heads",
    "ffn_hidden_dim",
    "context_length",
    "dropout",
    "position_encoding",
    "activation",
)
OPTIONAL_MODEL_KEYS = ("position_encoding", "activation")


def _get(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise NanoLLMError(f"Config key {key} could not be read: {err.msg if hasattr(err, 'msg') else err}") from None


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NanoLLMError(f"{key} must be an integer >= 1, got {value!r}.")
    return value


def _positive_number(cfg: DictConfig, key: str) -> float:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise NanoLLMError(f"{key} must be a finite number > 0, got {value!r}.")
    return float(value)


def model_config_from(cfg: DictConfig, vocab_size: int) -> ModelConfig:
    """The model architecture named by `cfg.model` (validated by ModelConfig)."""
    values = {key: _get(cfg, f"model.{key}") for key in MODEL_KEYS}
    # A preset written before a choice existed (a user's own) gets the choice's default; sizes have none.
    for key in OPTIONAL_MODEL_KEYS:
        if values[key] is None:
            del values[key]
    return ModelConfig(vocab_size=vocab_size, **values)


def _number(cfg: DictConfig, key: str, low: float, high: float, rule: str, low_ok=True, high_ok=True) -> float:
    """A finite number between low and high (inclusive unless said otherwise); `rule` is the message's wording."""
    value = _get(cfg, key)
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not (
        math.isfinite(number)
        and (low <= number if low_ok else low < number)
        and (number <= high if high_ok else number < high)
    ):
        raise NanoLLMError(f"{key} must be {rule}, got {value!r}.")
    return number


def outputs_path(cfg: DictConfig) -> Path:
    """`outputs_dir`, where runs go and where ckpt_path=last looks (train.py, generate.py, eval.py): never null."""
    value = _get(cfg, "outputs_dir")
    if not isinstance(value, str) or not value:
        raise NanoLLMError(f"outputs_dir must be a directory path (the default is outputs), got {value!r}.")
    return Path(value)


def validate_config(cfg: DictConfig) -> None:
    """Raise NanoLLMError for the first invalid value, naming the key and a valid alternative."""
    outputs_path(cfg)
    name = _get(cfg, "experiment_name")  # recorded in results.json: a list here failed only after training
    if name is not None and not isinstance(name, (str, int, float)):
        raise NanoLLMError(f"experiment_name must be a name (a string), got {name!r}.")
    _number(cfg, "model.dropout", 0, 1, "a number in [0, 1)", high_ok=False)
    model_config_from(cfg, vocab_size=1)  # sizes, divisibility and the position encoding
    _positive_number(cfg, "optim.lr")
    _number(cfg, "optim.weight_decay", 0, math.inf, "a number >= 0")
    warmup = _get(cfg, "optim.warmup_steps")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise NanoLLMError(f"optim.warmup_steps must be an integer >= 0, got {warmup!r}.")
    betas = _get(cfg, "optim.betas")
    if not OmegaConf.is_list(betas) or len(betas) != 2:
        raise NanoLLMError(f"optim.betas must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.99], got {betas!r}.")
    for index in range(2):
        _number(cfg, f"optim.betas[{index}]", 0, 1, "in [0, 1) (e.g. optim.betas=[0.9,0.99])", high_ok=False)
    # A negative ratio would turn the end of the schedule into gradient ascent.
    _number(cfg, "optim.min_lr_ratio", 0, 1, "a number in [0, 1] (the final learning rate as a fraction of optim.lr)")
    name = _get(cfg, "optim.name")  # none in configs from before optim=muon: AdamW
    if name is not None and name not in OPTIMIZERS:
        raise NanoLLMError(f"optim.name must be one of {', '.join(OPTIMIZERS)} (choose with optim=muon), got {name!r}.")
    if name == "muon":
        _positive_number(cfg, "optim.muon_lr")
        _number(cfg, "optim.muon_weight_decay", 0, math.inf, "a number >= 0")
        _number(cfg, "optim.momentum", 0, 1, "a number in [0, 1)", high_ok=False)
        ns_steps = _get(cfg, "optim.ns_steps")
        if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 1 <= ns_steps < 100:
            raise NanoLLMError(f"optim.ns_steps must be an integer in [1, 100), got {ns_steps!r}.")
        if not isinstance(_get(cfg, "optim.nesterov"), bool):
            raise NanoLLMError(f"optim.nesterov must be true or false, got {_get(cfg, 'optim.nesterov')!r}.")
    _positive_int(cfg, "data.batch_size")
    for key in ("data.val_batch_size", "data.val_windows"):
        if _get(cfg, key) is not None:
            _positive_int(cfg, key)
    overfit = _get(cfg, "data.overfit_batches")
    if overfit is not None and (isinstance(overfit, bool) or not isinstance(overfit, int) or overfit < 0):
        raise NanoLLMError(f"data.overfit_batches must be an integer >= 0 (0 = off), got {overfit!r}.")
    _number(cfg, "data.val_fraction", 0, 1, "between 0 and 1 (exclusive)", low_ok=False, high_ok=False)
    _positive_int(cfg, "trainer.max_steps")
    _positive_int(cfg, "trainer.log_every_n_steps")
    _positive_int(cfg, "trainer.val_check_interval")
    _positive_int(cfg, "trainer.accumulate_grad_batches")
    if _get(cfg, "trainer.gradient_clip_val") is not None:
        _number(
            cfg, "trainer.gradient_clip_val", 0, math.inf, "a number > 0, or null to disable clipping", low_ok=False
        )
    _positive_int(cfg, "checkpoint_interval")
    if _get(cfg, "checkpoint_keep") is not None:
        _positive_int(cfg, "checkpoint_keep")
    seed = _get(cfg, "seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        raise NanoLLMError(f"seed must be an integer in [0, 2^32), or null to draw one, got {seed!r}.")
    _validate_sample(cfg)
    _check_choice(cfg, "sample.beyond_context", BEYOND_CONTEXT)
    _validate_early_stopping(cfg)
    _validate_devices(cfg)
    compile_mode = cfg.get("compile", False)
    if not isinstance(compile_mode, bool) and compile_mode not in COMPILE_MODES:
        raise NanoLLMError(
            f"compile must be true, false or a torch.compile mode ({', '.join(COMPILE_MODES)}), got {compile_mode!r}."
        )
    path = _get(cfg, "data.path")
    if not path:
        raise NanoLLMError("data.path is empty: pass data.path=/path/to/text.txt.")
    if cfg.get("init_from") and cfg.get("ckpt_path"):
        raise NanoLLMError(
            "init_from and ckpt_path were both given: ckpt_path resumes a run, init_from starts a new run from a "
            "checkpoint's weights. Keep one of them."
        )


def _check_choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> None:
    value = _get(cfg, key)
    if value is not None and value not in choices:
        raise NanoLLMError(f"{key} must be one of {', '.join(choices)}, got {value!r}.")


def _validate_devices(cfg: DictConfig) -> None:
    """A GPU run needs the GPUs it asks for; Lightning would stop with a multi-line error."""
    accelerator = str(_get(cfg, "trainer.accelerator"))
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise NanoLLMError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible to this process; use "
            "trainer.accelerator=cpu (or auto), or run on a machine with a GPU."
        )
    devices = _get(cfg, "trainer.devices")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > available:
        raise NanoLLMError(
            f"trainer.devices={devices} but only {available} CUDA GPU(s) are visible; use trainer.devices={available} "
            "or fewer (or trainer.devices=auto)."
        )


def _validate_early_stopping(cfg: DictConfig) -> None:
    """callbacks=early_stopping's settings: Lightning reads them only at the first validation."""
    if _get(cfg, "callbacks.early_stopping") is None:
        return
    # EarlyStopping stops after `patience` validations in a row without improvement (0: at the first).
    patience = _get(cfg, "callbacks.early_stopping.patience")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise NanoLLMError(f"callbacks.early_stopping.patience must be an integer >= 0, got {patience!r}.")
    _number(cfg, "callbacks.early_stopping.min_delta", 0, math.inf, "a number >= 0 (the least change that counts)")
    if _get(cfg, "callbacks.early_stopping.stopping_threshold") is not None:
        _number(
            cfg,
            "callbacks.early_stopping.stopping_threshold",
            -math.inf,
            math.inf,
            "a number (the val/loss to stop at), or null for none",
        )


def _validate_sample(cfg: DictConfig, prefix: str = "sample.") -> None:
    """Sampling settings (train.py's end-of-training sample, checked before training starts; generate.py's)."""
    prompt = _get(cfg, f"{prefix}prompt")
    if not isinstance(prompt, str):
        raise NanoLLMError(
            f"{prefix}prompt must be text, got {prompt!r}: Hydra reads unquoted null, true/false and numbers as "
            f"values; quote the prompt, e.g. '{prefix}prompt=\"1e3\"'."
        )
    tokens = _get(cfg, f"{prefix}max_new_tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise NanoLLMError(f"{prefix}max_new_tokens must be an integer >= 0, got {tokens!r}.")
    _number(cfg, f"{prefix}temperature", 0, math.inf, f"a number > 0 ({prefix}top_k=1 samples greedily)", low_ok=False)
    top_k = _get(cfg, f"{prefix}top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise NanoLLMError(f"{prefix}top_k must be an integer >= 1 or null, got {top_k!r}.")
    seed = _get(cfg, f"{prefix}seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise NanoLLMError(f"{prefix}seed must be an integer >= 0, or null for a random one, got {seed!r}.")


DEVICES = ("cpu", "cuda", "auto")
# torch.compile's modes: reduce-overhead replays CUDA graphs (launch overhead gone: small models on GPUs).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def validate_generate_config(cfg: DictConfig) -> None:
    """generate.py's settings, each bad value named before the checkpoint is even read."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise NanoLLMError(
            "ckpt_path is required: python generate.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt "
            "(or ckpt_path=last / best)."
        )
    _validate_sample(cfg, prefix="")
    _check_choice(cfg, "beyond_context", BEYOND_CONTEXT)
    _positive_int(cfg, "num_samples")
    if not isinstance(_get(cfg, "use_cache"), bool):
        raise NanoLLMError(f"use_cache must be true or false, got {_get(cfg, 'use_cache')!r}.")
    check_device(_get(cfg, "device"))


def check_device(device) -> None:
    if device not in DEVICES:
        raise NanoLLMError(f"device must be one of {', '.join(DEVICES)}, got {device!r}.")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise NanoLLMError("device=cuda but no CUDA GPU is visible to this process; use device=cpu or device=auto.")


def _run_name() -> str:
    """The loggers' run name: in a sweep the swept overrides (e.g. `model=small`), else the command-line
    overrides, and `defaults` for a run without any (or outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return "defaults"
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        swept = _swept_keys(hydra_cfg)
        overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept] or [f"job{hydra_cfg.job.num}"]
    else:
        excluded = set(hydra_cfg.job.config.override_dirname.exclude_keys)
        overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in excluded]
    # One path component, well under the 255-byte file-name limit.
    return ",".join(sorted(overrides)).replace("/", "_")[:150] or "defaults"


def _swept_keys(hydra_cfg) -> set[str]:
    """Keys a multirun sweeps: its sweeper's params and the command-line overrides with several values."""
    from pathlib import Path

    keys = set((hydra_cfg.sweeper.get("params") or {}).keys())
    record = Path(hydra_cfg.sweep.dir) / "multirun.yaml"  # Hydra writes the sweep's definition here
    if record.exists():
        for override in OmegaConf.load(record).hydra.overrides.task:
            key, _, value = override.partition("=")
            if "," in value:
                keys.add(key.lstrip("+~"))
    return keys


def claim_unique_dir(path: str) -> str:
    """Create `path`, or `path-1`, `path-2`, ... if it exists, and return the one created.

    Hydra's `${now:%H-%M-%S}` has one-second resolution: two runs started in the same second would
    share one directory (and one results.json). `os.mkdir` fails when the directory exists, even
    between machines on a shared filesystem, so each run claims its own before writing anything.
    """
    import os

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    candidate, suffix = path, 0
    while True:
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = f"{path}-{suffix}"


# `${mul:4,${model.embedding_dim}}` in width_scaling; `${run_name:}` in the TensorBoard logger config.
OmegaConf.register_new_resolver("mul", lambda a, b: a * b, replace=True)
OmegaConf.register_new_resolver("run_name", _run_name, replace=True)
# `${unique_dir:...}` in conf/hydra/default.yaml. Cached: every later read of hydra.run.dir gets the same directory.
OmegaConf.register_new_resolver("unique_dir", claim_unique_dir, replace=True, use_cache=True)
# `save_top_k: ${keep_count:${checkpoint_keep}}`: null keeps every checkpoint (Lightning's -1).
OmegaConf.register_new_resolver("keep_count", lambda keep: -1 if keep is None else keep, replace=True)
