"""nanollm: character-level Transformer language models on PyTorch Lightning and Hydra."""

from nanollm import config as _config  # noqa: F401  (registers the OmegaConf resolvers conf/ uses)
from nanollm.api import CheckpointInfo, generate_text, load_checkpoint, load_model, set_seed, train_with_config
from nanollm.errors import NanoLLMError
from nanollm.model import ModelConfig, TransformerLanguageModel
from nanollm.tokenizer import CharTokenizer

__all__ = [
    "CharTokenizer",
    "CheckpointInfo",
    "ModelConfig",
    "NanoLLMError",
    "TransformerLanguageModel",
    "generate_text",
    "load_checkpoint",
    "load_model",
    "set_seed",
    "train_with_config",
]
__version__ = "0.1.0"
