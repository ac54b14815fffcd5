"""A GPT-style character Transformer in plain PyTorch (no Lightning, no Hydra).

Pre-norm blocks of causal self-attention and a feed-forward network, rotary position
embeddings (RoPE; learned absolute positions as an option), and an LM head tied to the token
embedding. An optional KV cache makes generation cost O(T) per new token instead of O(T^2); with
RoPE it can roll on past the context (`new_cache(rolling=True)`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanollm.errors import NanoLLMError

POSITION_ENCODINGS = ("rope", "learned")
# The feed-forward network's non-linearity: "gelu" is the exact (erf) GELU, PyTorch's default and
# nanoGPT's; "gelu_tanh" is GPT-2's tanh approximation, this project's default before (checkpoints
# that name none used it). On a CPU the exact one trains faster: its kernel for large tensors is
# oneDNN's, ~3x faster than ATen's tanh form (BENCHMARKS.md).
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}  # name -> F.gelu's `approximate`


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
    activation: str = "gelu"

    def __post_init__(self) -> None:
        for key in ("vocab_size", "embedding_dim", "num_layers", "num_heads", "ffn_hidden_dim", "context_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise NanoLLMError(f"model.{key} must be a positive integer, got {value!r}.")
        if self.embedding_dim % self.num_heads:
            raise NanoLLMError(
                f"model.embedding_dim ({self.embedding_dim}) must be divisible by model.num_heads ({self.num_heads}); "
                f"change one of them, e.g. {self._valid_head_settings()}."
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
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise NanoLLMError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}.")

    @classmethod
    def from_saved(cls, saved: dict) -> ModelConfig:
        """The config stored in a checkpoint; a key it lacks gets the meaning it had before the key existed:
        learned positions (before RoPE) and the tanh GELU (before model.activation)."""
        return cls(**{"position_encoding": "learned", "activation": "gelu_tanh", **saved})

    def _valid_head_settings(self) -> str:
        """The nearest num_heads that divides embedding_dim, and the nearest larger embedding_dim that
        num_heads divides (RoPE also needs an even head size)."""
        pair = 2 if self.position_encoding == "rope" else 1
        dim = self.embedding_dim
        heads = [h for h in range(1, dim + 1) if dim % (h * pair) == 0]
        width = -(-dim // (self.num_heads * pair)) * self.num_heads * pair
        if not heads:  # an odd width with RoPE: only the width can change
            return f"model.embedding_dim={width}"
        nearest = min(heads, key=lambda h: (abs(h - self.num_heads), h))
        return f"model.num_heads={nearest} or model.embedding_dim={width}"

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Keys and values of every layer for a batch of sequences: one slot per position of the context.

    `length` counts the tokens the cache has seen. A plain cache holds at most `context_length` of
    them. A rolling cache (RoPE only) keeps going: token p lives in slot p % context_length and
    replaces the oldest, so every new token attends to the last `context_length` tokens however long
    the text grows. RoPE scores depend only on how far apart two tokens are, so keys rotated by their
    absolute positions stay valid; learned position embeddings have no vector past the context.
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype, rolling: bool = False
    ):
        head_dim = config.embedding_dim // config.num_heads
        # Per layer (keys/values, B, H, slot, D): a token's key and value are stored by one copy.
        shape = (2, batch_size, config.num_heads, config.context_length, head_dim)
        self.layers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.length = 0
        self.capacity = config.context_length
        self.rolling = rolling
        self.rotation_block: tuple[int, torch.Tensor] | None = None  # rotations of the latest context-sized block
        self.weights: tuple | None = None  # the model's tensors for one-token steps (decode_weights), gathered once

    def attention_mask(self, T: int, device: torch.device) -> torch.Tensor | None:
        """(T, keys) booleans: may new token i see key j of what `store` returns?

        None when every key may be seen (one new token) or the mask is plainly causal (a first chunk
        that fits the context). Otherwise key j is visible to query i iff its position is at most
        i's and fewer than `capacity` positions before it (the window a rolling cache keeps).
        """
        start = self.length
        if T == 1 or (start == 0 and T <= self.capacity):
            return None
        queries = torch.arange(start, start + T, device=device)
        if start + T <= self.capacity:  # slot j holds position j
            keys = torch.arange(start + T, device=device)
        else:  # the ring's filled slots (slot s holds the latest position = s mod capacity), then the new tokens
            slots = torch.arange(min(start, self.capacity), device=device)
            keys = torch.cat((start - 1 - (start - 1 - slots) % self.capacity, queries))
        queries = queries[:, None]
        return (keys <= queries) & (keys > queries - self.capacity)

    def store(self, layer: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values (2, B, H, T, D) of `layer`; return all keys and values they attend to."""
        cached, start, T = self.layers[layer], self.length, kv.size(3)
        if T == 1:  # a generation step: its slot, then what is filled
            cached.narrow(3, start % self.capacity, 1).copy_(kv)
            # Past the context the ring holds exactly the last `capacity` tokens; attention does not
            # care in which order.
            return (cached if start + 1 >= self.capacity else cached[:, :, :, : start + 1]).unbind(0)
        if start + T <= self.capacity:
            cached[:, :, :, start : start + T] = kv
            return cached[:, :, :, : start + T].unbind(0)
        # Several tokens past the end: they see the ring as it was and each other (attention_mask
        # says which), then the newest `capacity` of them replace the oldest entries.
        keys = torch.cat((cached[:, :, :, : min(start, self.capacity)], kv), dim=3)
        kept = min(T, self.capacity)
        slots = torch.arange(start + T - kept, start + T, device=kv.device) % self.capacity
        cached[:, :, :, slots] = kv[:, :, :, T - kept :].to(cached.dtype)  # under autocast kv may be bf16
        return keys.unbind(0)


def rotary_table(context_length: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(context_length, head_dim / 2, 2): cos and sin of the angle by which each position turns each pair.

    Stored as real numbers: `module.to(dtype)` would drop the imaginary part of a complex buffer.
    """
    inverse_frequencies = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context_length, dtype=torch.float32), inverse_frequencies)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def rotary_turn(offset: int, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(head_dim / 2,) complex64: the rotation of each pair by `offset` positions.

    Angles are computed in float64: in float32, position 10^5 would already be off by ~0.01 radian.
    """
    inverse_frequencies = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = offset * inverse_frequencies
    return torch.complex(angles.cos(), angles.sin()).to(torch.complex64)


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Turn each pair of dimensions (2i, 2i+1) of `x` (..., D) by its angle: one complex multiply.

    `rotation` is complex and broadcasts against the (..., D / 2) pairs. One kernel forward and one
    backward: with the real-valued rotate-half form (five kernels) a nano training step took 19%
    longer than with learned positions, with this one 4%.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # bf16 has no complex type
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # A plain function rather than nn.Dropout modules: when it does nothing (eval, or p == 0) it costs
    # nothing, which matters when generation runs one token at a time.
    return F.dropout(x, p, training=True) if training and p > 0 else x


class DecodeLayer(NamedTuple):
    """One block's tensors, as TransformerLanguageModel.decode_one reads them (weights transposed, as addmm takes them)."""

    norm1: tuple[torch.Tensor, torch.Tensor, float]
    qkv_b: torch.Tensor
    qkv_w: torch.Tensor
    proj_b: torch.Tensor
    proj_w: torch.Tensor
    norm2: tuple[torch.Tensor, torch.Tensor, float]
    fc_b: torch.Tensor
    fc_w: torch.Tensor
    out_b: torch.Tensor
    out_w: torch.Tensor


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.embedding_dim, 3 * config.embedding_dim)
        self.proj = nn.Linear(config.embedding_dim, config.embedding_dim)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        rotary: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Attention outputs (B, T, C), or (B, 1, C) for the last position alone with `last_only`
        (every position's key and value is still computed and cached)."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads)
        if rotary is not None:
            # q, k and v in one multiply; v's angles are 0 (slicing q and k out costs more in backward).
            # Before the permute, the rotations of a batch row lie in memory as the pairs do: one long
            # vectorised loop instead of one per head (measured 1.6-2x faster, forward and backward).
            qkv = apply_rotary(qkv, rotary)
        # (B, T, 3, H, D) -> (3, B, H, T, D) in one view (decoding is per-op bound).
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if cache is not None:
            k, v = cache.store(layer, qkv[1:])
        if last_only:  # the last query sees every key it is given (a mask says which, past a rolling context)
            q, T = q[:, :, -1:], 1
            mask = None if mask is None else mask[-1:]
        # SDPA picks flash / memory-efficient kernels where the hardware has them. Without a mask,
        # several tokens are plainly causal (no cache, or a first chunk) and one token sees every key.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=mask is None and T > 1
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return dropout(self.proj(y), self.dropout, self.training)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.embedding_dim, config.ffn_hidden_dim)
        self.proj = nn.Linear(config.ffn_hidden_dim, config.embedding_dim)
        self.dropout = config.dropout
        self.approximate = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embedding_dim)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.embedding_dim)
        self.ffn = FeedForward(config)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        rotary: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        attended = self.attn(self.norm1(x), cache, layer, rotary, mask, last_only)
        x = (x[:, -1:] if last_only else x) + attended
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
            # (T, 3, H, D/2, 2): laid out as the (B, T, 3, H, D/2) pairs of q, k and v that it turns.
            table = torch.stack((table, table, unturned), dim=1)[:, :, None]
            table = table.expand(-1, -1, config.num_heads, -1, -1).contiguous()
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
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and the loss if `targets` are given.

        With a cache, `idx` continues the sequences the cache has seen: any number of tokens at a
        time, each attending to the cached tokens and the new ones before it. `last_only` gives the
        last position's logits alone (B, 1, vocab), what sampling reads: the last block then computes
        only that position's query, feed-forward and head.
        """
        if last_only and targets is not None:
            raise NanoLLMError("last_only gives one position's logits: it cannot score targets for every position.")
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.context_length and not (cache is not None and cache.rolling):
            raise NanoLLMError(
                f"Sequence of {start + T} tokens exceeds the model's context_length ({self.config.context_length}); "
                "feed at most context_length tokens, or continue through model.new_cache(rolling=True) (RoPE models)."
            )
        rotary = None if self.position_embedding is not None else self.rotation(start, T, cache)
        if cache is not None and T == 1 and not self.training:
            logits = self.decode_one(idx, cache, rotary)
        else:
            x = self.token_embedding(idx)  # (B, T, C)
            if self.position_embedding is not None:
                x = x + self.position_embedding.weight[start : start + T]  # a slice: no index tensor per step
            x = dropout(x, self.config.dropout, self.training)
            mask = cache.attention_mask(T, idx.device) if cache is not None else None
            for layer, block in enumerate(self.blocks):
                x = block(x, cache, layer, rotary, mask, last_only and layer == len(self.blocks) - 1)
            logits = self.lm_head(self.final_norm(x))  # (B, T, vocab)
        if cache is not None:
            cache.length += T
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def decode_one(self, idx: torch.Tensor, cache: KVCache, rotary: torch.Tensor | None) -> torch.Tensor:
        """forward() for one new token per sequence (B, 1) through the cache, without nn.Module calls.

        Generation runs one token at a time, and on a small model a step is nearly all per-call
        overhead: module calls and the F.* wrappers took half of a nano step. These are the blocks'
        operations in the same order on the same shapes (F.linear is addmm), so the logits are
        bit-identical to the module path; test_model compares the two.
        """
        if cache.weights is None:  # the weights do not change during a generation: gather them once
            cache.weights = self.decode_weights()
        embedding, positions, layers, final_norm, head = cache.weights
        B, C, H = idx.size(0), self.config.embedding_dim, self.config.num_heads
        shape, approximate = (C,), ACTIVATIONS[self.config.activation]
        x = torch.embedding(embedding, idx.view(B))  # (B, C)
        if positions is not None:
            x = x + positions[cache.length]
        for layer, w in enumerate(layers):
            qkv = torch.addmm(w.qkv_b, torch.layer_norm(x, shape, *w.norm1), w.qkv_w)
            if rotary is not None and qkv.dtype == torch.float32:  # apply_rotary without its dtype round trip
                pairs = torch.view_as_complex(qkv.view(B, 1, 3, H, C // H // 2, 2))
                qkv = torch.view_as_real(pairs * rotary).flatten(-2)  # (B, 1, 3, H, D)
            else:
                qkv = qkv.view(B, 1, 3, H, C // H)
                if rotary is not None:
                    qkv = apply_rotary(qkv, rotary)
            qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, 1, D)
            keys, values = cache.store(layer, qkv[1:])
            y = F.scaled_dot_product_attention(qkv[0], keys, values)  # (B, H, 1, D)
            x = x + torch.addmm(w.proj_b, y.reshape(B, C), w.proj_w)
            h = F.gelu(torch.addmm(w.fc_b, torch.layer_norm(x, shape, *w.norm2), w.fc_w), approximate=approximate)
            x = x + torch.addmm(w.out_b, h, w.out_w)
        return (torch.layer_norm(x, shape, *final_norm) @ head).view(B, 1, -1)

    def decode_weights(self) -> tuple:
        """The tensors decode_one reads, as plain references (nn.Module attribute lookups are slow)."""
        norm = lambda n: (n.weight, n.bias, n.eps)  # noqa: E731  (torch.layer_norm's arguments after the shape)
        layers = [
            DecodeLayer(
                norm(b.norm1), b.attn.qkv.bias, b.attn.qkv.weight.t(), b.attn.proj.bias, b.attn.proj.weight.t(),
                norm(b.norm2), b.ffn.fc.bias, b.ffn.fc.weight.t(), b.ffn.proj.bias, b.ffn.proj.weight.t(),
            )
            for b in self.blocks
        ]  # fmt: skip
        positions = self.position_embedding.weight if self.position_embedding is not None else None
        return self.token_embedding.weight, positions, layers, norm(self.final_norm), self.lm_head.weight.t()

    def rotation(self, start: int, T: int, cache: KVCache | None) -> torch.Tensor:
        """(T, 3, H, D/2) complex: how positions start .. start + T - 1 turn q and k (v is not turned)."""
        context = self.config.context_length
        if cache is None:
            return torch.view_as_complex(self.rotary_table[start : start + T].float())
        if T == 1:  # a generation step
            block, offset = divmod(start, context)
            return self.rotation_block(block, cache)[offset : offset + 1]
        pieces = []
        for block in range(start // context, (start + T - 1) // context + 1):
            first = block * context
            table = self.rotation_block(block, cache)
            pieces.append(table[max(start - first, 0) : min(start + T - first, context)])
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def rotation_block(self, block: int, cache: KVCache) -> torch.Tensor:
        """Rotations of positions block * context .. (block + 1) * context - 1, kept on the cache while used.

        Past the table (a rolling cache) position p turns by table[p % context] and then by whole
        contexts: exact for any p, and no table that grows with the text.
        """
        if cache.rotation_block is None or cache.rotation_block[0] != block:
            table = torch.view_as_complex(self.rotary_table.float())
            if block > 0:
                turn = rotary_turn(
                    block * self.config.context_length, self.config.embedding_dim // self.config.num_heads
                )
                turn = torch.stack((turn, turn, torch.ones_like(turn))).to(table.device)
                table = table * turn[:, None]  # (3, 1, D/2) against (T, 3, H, D/2)
            cache.rotation_block = (block, table)
        return cache.rotation_block[1]

    def new_cache(self, batch_size: int = 1, rolling: bool = False) -> KVCache:
        """An empty KV cache for `batch_size` sequences; `rolling` keeps going past the context (RoPE only)."""
        if rolling and self.position_embedding is not None:
            raise NanoLLMError(
                "A rolling KV cache needs model.position_encoding=rope: learned position embeddings have no vector "
                f"past position {self.config.context_length - 1}. Use a plain cache (rolling=False)."
            )
        param = self.token_embedding.weight
        return KVCache(self.config, batch_size, param.device, param.dtype, rolling)

    def flops_per_token(self) -> int:
        """Approximate training FLOPs per token (forward + backward), as in the PaLM appendix."""
        c = self.config
        return (
            6 * self.num_parameters(exclude_position_embedding=True)
            + 12 * c.num_layers * c.embedding_dim * c.context_length
        )
