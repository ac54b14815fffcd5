"""Start-up checks of a composed config: every bad value fails before training, naming its key."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nanollm.errors import NanoLLMError
from nanollm.model import ModelConfig

MODEL_KEYS = (
    "embedding_dim",
    "num_layers",
    "num_heads",
    "ffn_hidden_dim",
    "context_length",
    "dropout",
    "position_encoding",
)


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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise NanoLLMError(f"{key} must be a number > 0, got {value!r}.")
    return float(value)


def model_config_from(cfg: DictConfig, vocab_size: int) -> ModelConfig:
    """The model architecture named by `cfg.model` (validated by ModelConfig)."""
    return ModelConfig(vocab_size=vocab_size, **{key: _get(cfg, f"model.{key}") for key in MODEL_KEYS})


def validate_config(cfg: DictConfig) -> None:
    """Raise NanoLLMError for the first invalid value, naming the key and a valid alternative."""
    model_config_from(cfg, vocab_size=1)  # sizes, divisibility and dropout range
    _positive_number(cfg, "optim.lr")
    weight_decay = _get(cfg, "optim.weight_decay")
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise NanoLLMError(f"optim.weight_decay must be a number >= 0, got {weight_decay!r}.")
    warmup = _get(cfg, "optim.warmup_steps")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise NanoLLMError(f"optim.warmup_steps must be an integer >= 0, got {warmup!r}.")
    _positive_int(cfg, "data.batch_size")
    fraction = _get(cfg, "data.val_fraction")
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise NanoLLMError(f"data.val_fraction must be between 0 and 1 (exclusive), got {fraction!r}.")
    _positive_int(cfg, "trainer.max_steps")
    _positive_int(cfg, "trainer.log_every_n_steps")
    _positive_int(cfg, "trainer.val_check_interval")
    _positive_int(cfg, "checkpoint_interval")
    seed = _get(cfg, "seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise NanoLLMError(f"seed must be an integer, got {seed!r}.")
    path = _get(cfg, "data.path")
    if not path:
        raise NanoLLMError("data.path is empty: pass data.path=/path/to/text.txt.")


def _run_name() -> str:
    """TensorBoard run name: in a sweep the swept overrides (e.g. `model=small`), else the overrides.

    '' outside a Hydra app (then the run directory names the run).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return ""
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        swept = _swept_keys(hydra_cfg)
        overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept] or [f"job{hydra_cfg.job.num}"]
    else:
        excluded = set(hydra_cfg.job.config.override_dirname.exclude_keys)
        overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in excluded]
    # One path component, well under the 255-byte file-name limit.
    return ",".join(sorted(overrides)).replace("/", "_")[:150]


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


# `${mul:4,${model.embedding_dim}}` in width_scaling; `${run_name:}` in the TensorBoard logger config.
OmegaConf.register_new_resolver("mul", lambda a, b: a * b, replace=True)
OmegaConf.register_new_resolver("run_name", _run_name, replace=True)
