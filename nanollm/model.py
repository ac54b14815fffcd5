"""A GPT-style character Transformer in plain PyTorch (no Lightning, no Hydra).

Pre-norm blocks of causal self-attention and a feed-forward network, rotary position
embeddings (RoPE; learned absolute positions as an option), and an LM head tied to the token
embedding. An optional KV cache makes generation cost O(T) per new token instead of O(T^2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollm.errors import NanoLLMError

POSITION_ENCODINGS = ("rope", "learned")


@dataclass
class ModelConfig:
    vocab_size: int
    embedding_dim: int = 32
    num_layers: int = 2
    num_heads: int = 4
    ffn_hidden_dim: int = 64
    context_length: int = 64
    dropout: float = 0.0
    # "rope": rotary embeddings on queries and keys; "learned": a trained vector per position, added to the input.
    position_encoding: str = "rope"

    def __post_init__(self) -> None:
        for key in ("vocab_size", "embedding_dim", "num_layers", "num_heads", "ffn_hidden_dim", "context_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise NanoLLMError(f"model.{key} must be a positive integer, got {value!r}.")
        if self.embedding_dim % self.num_heads:
            raise NanoLLMError(
                f"model.embedding_dim ({self.embedding_dim}) must be divisible by model.num_heads ({self.num_heads}); "
                "change one of them, e.g. model.num_heads=4."
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise NanoLLMError(f"model.dropout must be in [0, 1), got {self.dropout!r}.")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise NanoLLMError(
                f"model.position_encoding must be one of {', '.join(POSITION_ENCODINGS)}, got {self.position_encoding!r}."
            )
        if self.position_encoding == "rope" and (self.embedding_dim // self.num_heads) % 2:
            raise NanoLLMError(
                f"model.position_encoding=rope needs an even head size, but embedding_dim / num_heads = "
                f"{self.embedding_dim // self.num_heads}; change model.num_heads or use model.position_encoding=learned."
            )

    @classmethod
    def from_saved(cls, saved: dict) -> ModelConfig:
        """The config stored in a checkpoint; those written before RoPE have no key and used learned positions."""
        return cls(**{"position_encoding": "learned", **saved})

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Keys and values of every layer for one batch of sequences, preallocated to the context."""

    def __init__(self, config: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        head_dim = config.embedding_dim // config.num_heads
        shape = (batch_size, config.num_heads, config.context_length, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.length = 0
        self.capacity = config.context_length


def rotary_table(context_length: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(context_length, head_dim / 2, 2): cos and sin of the angle by which each position turns each pair.

    Stored as real numbers: `module.to(dtype)` would drop the imaginary part of a complex buffer.
    """
    inverse_frequencies = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context_length, dtype=torch.float32), inverse_frequencies)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Turn each pair of dimensions (2i, 2i+1) of `x` (..., T, D) by its angle: one complex multiply.

    `rotation` is complex and broadcasts against the (..., T, D / 2) pairs. One kernel forward and one
    backward: with the real-valued rotate-half form (five kernels) a nano training step took 19%
    longer than with learned positions, with this one 4%.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # bf16 has no complex type
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # A plain function rather than nn.Dropout modules: when it does nothing (eval, or p == 0) it costs
    # nothing, which matters when generation runs one token at a time.
    return F.dropout(x, p, training=True) if training and p > 0 else x


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embedding_dim, 3 * config.embedding_dim)
        self.proj = nn.Linear(config.embedding_dim, config.embedding_dim)
        self.dropout = config.dropout

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rotary: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> (3, B, H, T, D), in as few operations as possible (decoding is per-op bound).
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        if rotary is None:
            q, k, v = qkv.unbind(0)
        else:  # q, k and v in one multiply; v's angles are 0 (slicing q and k out costs more in backward)
            q, k, v = apply_rotary(qkv, rotary).unbind(0)
        causal = True
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start : start + T] = k
            cache.values[layer][:, :, start : start + T] = v
            k, v = cache.keys[layer][:, :, : start + T], cache.values[layer][:, :, : start + T]
            # A single new token may attend to everything cached; a prefill (start == 0) is plain causal.
            causal = start == 0
        # SDPA picks flash / memory-efficient kernels where the hardware has them.
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=causal and T > 1
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return dropout(self.proj(y), self.dropout, self.training)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.embedding_dim, config.ffn_hidden_dim)
        self.proj = nn.Linear(config.ffn_hidden_dim, config.embedding_dim)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's tanh GELU: on a CPU the exact (erf) form costs ~4x more per call on the small vectors
        # of one-token decoding, with no measurable difference in training speed.
        return dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embedding_dim)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.embedding_dim)
        self.ffn = FeedForward(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rotary: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, layer, rotary)
        return x + self.ffn(self.norm2(x))


class TransformerLanguageModel(nn.Module):
    """Next-character predictor: `forward(idx, targets)` returns `(logits, loss)`."""

    def __init__(self, config: ModelConfig | None = None, **kwargs):
        super().__init__()
        config = config or ModelConfig(**kwargs)
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.position_embedding = None
        if config.position_encoding == "learned":
            self.position_embedding = nn.Embedding(config.context_length, config.embedding_dim)
        else:  # a buffer, so it follows .to(device); not saved, since it is recomputed from the config
            table = rotary_table(config.context_length, config.embedding_dim // config.num_heads)
            unturned = torch.tensor([1.0, 0.0]).expand_as(table)  # cos 0, sin 0: values keep their place
            # (3, 1, 1, T, D/2, 2): broadcasts over the (3, B, H, T, D/2) pairs of q, k, v.
            table = torch.stack((table, table, unturned))[:, None, None]
            self.register_buffer("rotary_table", table, persistent=False)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.embedding_dim)
        self.lm_head = nn.Linear(config.embedding_dim, config.vocab_size, bias=False)
        # Weight tying: the output projection shares the token embedding (fewer parameters, better loss).
        self.lm_head.weight = self.token_embedding.weight
        self.apply(self._init_weights)
        # GPT-2 init: residual projections scaled by 1/sqrt(2 * num_layers) keep the residual stream's variance flat.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_position_embedding: bool = False) -> int:
        """Number of trainable parameters (the tied head is counted once)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_position_embedding and self.position_embedding is not None:
            total -= self.position_embedding.weight.numel()
        return total

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(f"Sequence of {start + T} tokens exceeds context_length {self.config.context_length}")
        x = self.token_embedding(idx)  # (B, T, C)
        rotary = None
        if self.position_embedding is not None:
            x = x + self.position_embedding.weight[start : start + T]  # a slice: no index tensor per step
        else:
            rotary = torch.view_as_complex(self.rotary_table[:, :, :, start : start + T].float())
        x = dropout(x, self.config.dropout, self.training)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, rotary)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.final_norm(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def new_cache(self, batch_size: int = 1) -> KVCache:
        param = self.token_embedding.weight
        return KVCache(self.config, batch_size, param.device, param.dtype)

    def flops_per_token(self) -> int:
        """Approximate training FLOPs per token (forward + backward), as in the PaLM appendix."""
        c = self.config
        return (
            6 * self.num_parameters(exclude_position_embedding=True)
            + 12 * c.num_layers * c.embedding_dim * c.context_length
        )
