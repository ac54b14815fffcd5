"""Sampling from a TransformerLanguageModel: temperature, top-k, a seed, the KV cache, several samples at once."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from nanollm.errors import NanoLLMError
from nanollm.model import TransformerLanguageModel

# What the model sees once the text outgrows its context. "recompute": the window slides and is read
# afresh, at positions 0 .. context - 1, one full pass per new token. "rolling" (RoPE models): a rolling
# KV cache keeps the last context_length keys and values at their absolute positions, one
# single-token step per new token; deeper layers then carry information from beyond the window.
BEYOND_CONTEXT = ("recompute", "rolling")

# A single-token step of a smaller CPU model is too small to gain from intra-op threads: they only add
# synchronisation (on 2 cores: nano 8% and a 204K-parameter model 3% slower with two threads). Larger
# ones gain (medium 0.93x, the 800K reference model 0.71x, large 0.61x the one-thread time). The
# prefill uses every thread either way.
SINGLE_THREAD_DECODING_BELOW = 300_000  # parameters

# The token history holds the window the model reads plus room for this many new tokens; when it is
# full, the last window moves to its front. Memory does not grow with max_new_tokens.
HISTORY_CHUNK = 1024


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """Reject sampling settings that have no meaning, with the fix in the message."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise NanoLLMError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise NanoLLMError(
            f"temperature must be a finite number > 0, got {temperature!r} (use top_k=1 for greedy decoding)."
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise NanoLLMError(f"top_k must be an integer >= 1 or null, got {top_k!r}.")


def check_beyond_context(beyond_context: str) -> None:
    if beyond_context not in BEYOND_CONTEXT:
        raise NanoLLMError(f"beyond_context must be one of {', '.join(BEYOND_CONTEXT)}, got {beyond_context!r}.")


def rolls(model: TransformerLanguageModel, beyond_context: str) -> bool:
    """Whether `beyond_context` rolls for this model.

    Learned position embeddings have a vector for positions 0 .. context - 1 only, so their window
    cannot roll: "rolling" falls back to "recompute" for them.
    """
    return beyond_context == "rolling" and model.config.position_encoding == "rope"


def receptive_field(model: TransformerLanguageModel) -> int:
    """How many of the last tokens decide the next one through a rolling cache.

    Each layer attends `context - 1` tokens further back, so older tokens cannot matter; a prompt
    longer than this is fed from here, and the path without a cache re-reads only this many.
    """
    return model.config.num_layers * (model.config.context_length - 1) + 1


@torch.inference_mode()
def generate_steps(
    model: TransformerLanguageModel,
    prompt_ids: list[int],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    beyond_context: str = "recompute",
) -> Iterator[torch.Tensor]:
    """Yield the next token of `num_samples` continuations of one prompt, a (num_samples,) CPU tensor per step.

    All samples advance together: one batched forward pass per step. The model sees at most its
    last `context_length` tokens; past them see BEYOND_CONTEXT. With the cache, each new token
    costs one single-token step until the text outgrows the context; from then on "recompute"
    re-reads the window every step, as the path without a cache does (a cache has nothing left to
    reuse), so both paths give the same tokens.
    """
    check_sampling_args(max_new_tokens, temperature, top_k)
    check_beyond_context(beyond_context)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise NanoLLMError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
    if not prompt_ids:
        raise NanoLLMError("The prompt is empty: give at least one character, e.g. prompt='The '.")
    rolling = rolls(model, beyond_context)
    was_training = model.training
    model.eval()
    device = model.token_embedding.weight.device
    # The window the model reads: the last `context` tokens, or a rolling cache's receptive field.
    window = receptive_field(model) if rolling else model.config.context_length
    kept = prompt_ids[-window:]  # no step reads older tokens
    capacity = min(len(kept) + max_new_tokens, window + HISTORY_CHUNK)
    tokens = torch.empty(num_samples, capacity, dtype=torch.long, device=device)
    tokens[:, : len(kept)] = torch.tensor(kept, dtype=torch.long, device=device)
    length = len(kept)
    cache = model.new_cache(num_samples, rolling) if use_cache else None
    pending = tokens[:, :length]  # tokens not yet seen by the cache
    noise = None
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    try:
        for step in range(max_new_tokens):
            if step == 1 and cache is not None and device.type == "cpu":
                if model.num_parameters() < SINGLE_THREAD_DECODING_BELOW:
                    torch.set_num_threads(1)
                # The exact GELU goes to oneDNN on CPUs, whose set-up costs ~8 us a call; ATen's own
                # kernel takes ~1 us on one token's vector (oneDNN is faster on training's large tensors).
                torch.backends.mkldnn.enabled = False
            if cache is not None and not rolling and cache.length + pending.size(1) > window:
                # Past the context every step re-reads the whole window: a cache has nothing left to reuse.
                cache = None
            # Sampling reads the last position's logits only (last_only skips the rest of the last block).
            if cache is None:
                # Without a cache every step re-reads the window; a rolling window from scratch.
                fresh = model.new_cache(num_samples, rolling=True) if rolling else None
                logits, _ = model(tokens[:, max(0, length - window) : length], cache=fresh, last_only=True)
            else:
                # forward() itself: nn.Module's call wrapper (hooks, which generation never adds) costs
                # ~4 us of a nano step's ~120.
                logits, _ = model.forward(pending, cache=cache, last_only=True)
            if top_k != 1 and step % NOISE_STEPS == 0:
                noise = draw_noise(min(NOISE_STEPS, max_new_tokens - step), num_samples, logits.size(-1), generator)
            next_ids = sample_next(
                logits[:, -1], temperature, top_k, noise=None if noise is None else noise[step % NOISE_STEPS]
            )
            if cache is None or not rolling:  # the history feeds windows; a rolling cache never re-reads it
                if length == capacity:  # full: keep the last window, all that later steps read
                    tokens[:, :window] = tokens[:, length - window : length].clone()
                    length = window
                tokens[:, length] = next_ids
            pending = next_ids[:, None].to(device)
            length += 1
            yield next_ids
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = onednn
        model.train(was_training)


def generate_tokens(
    model: TransformerLanguageModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    beyond_context: str = "recompute",
) -> Iterator[int]:
    """Yield new token ids one at a time (so callers can stream them); see generate_steps."""
    for next_ids in generate_steps(
        model, prompt_ids, 1, max_new_tokens, temperature, top_k, generator, use_cache, beyond_context
    ):
        yield next_ids.item()


def generate_batch(
    model: TransformerLanguageModel,
    prompt_ids: list[int],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    beyond_context: str = "recompute",
) -> list[list[int]]:
    """`num_samples` continuations of one prompt, sampled together (one batched pass per step).

    The same generator state gives the same samples; num_samples=1 gives generate_tokens' text.
    Sample i is not the text that the i-th of several generate_tokens calls would give: the
    steps draw for all samples in turn.
    """
    steps = generate_steps(
        model, prompt_ids, num_samples, max_new_tokens, temperature, top_k, generator, use_cache, beyond_context
    )
    for step, next_ids in enumerate(steps):
        if step == 0:  # after generate_steps' checks; all of it at once, so a request too large fails now
            samples = torch.empty(num_samples, max_new_tokens, dtype=torch.long)
        samples[:, step] = next_ids
    return samples.tolist() if max_new_tokens else [[] for _ in range(num_samples)]


# Sampling noise is drawn for this many steps at once: one call instead of one per step. (A caller
# that stops a generation early leaves the generator up to NOISE_STEPS - 1 steps further on.)
NOISE_STEPS = 64


def draw_noise(steps: int, num_samples: int, vocab_size: int, generator: torch.Generator | None) -> torch.Tensor:
    """Exp(1) noise (steps, num_samples, vocab) for sample_next, on the CPU.

    The generator fills a tensor in order, so this draws exactly the numbers, and as many, as
    drawing (num_samples, vocab) at each step would: the text does not depend on NOISE_STEPS.
    """
    return torch.empty(steps, num_samples, vocab_size).exponential_(generator=generator)


# Below this temperature, float32 logits divided by it could overflow; sampling is greedy there anyway.
GREEDY_BELOW = 1e-20


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one token id per row of `logits` (N, vocab): a (N,) tensor on the CPU.

    Draws exactly as torch.multinomial(probs, 1) (the argmax of probs / Exp(1) noise picks i with
    probability probs[i]) from the same numbers of the generator, without multinomial's checks,
    which cost more than the draw on a small model, and with the noise drawn ahead if given
    (`noise`, (N, vocab), from draw_noise). Row i draws after row i - 1, so a batch of one draws
    what a single sample does.
    """
    logits = logits.float()
    if temperature < GREEDY_BELOW:  # logits / temperature would overflow to inf: take the limit, greedy
        top_k = 1
    elif temperature != 1:  # dividing by 1 changes nothing
        logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]  # each row's own k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_k == 1:
        return torch.argmax(logits, dim=-1).cpu()
    # Sample on the CPU so a seed gives the same text whatever device the model is on.
    probs = torch.softmax(logits, dim=-1).cpu()
    if noise is None:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    return torch.argmax(probs / noise, dim=-1)


@torch.inference_mode()
def rolling_log_likelihood(model: TransformerLanguageModel, ids) -> tuple[float, int]:
    """Sum of the negative log-likelihoods (nats) of `ids[1:]` as rolling generation sees them, and their count.

    Each token is predicted through a rolling KV cache, as beyond_context="rolling" predicts it
    while generating: past the context, from keys and values computed when their tokens came.
    The tokens go in a context's worth at a time, which the attention masks make equal to one at a
    time (test_generation checks). What "recompute" sees is sliding windows with stride 1
    (evaluation.score_tokens with stride=1).
    """
    if model.config.position_encoding != "rope":
        raise NanoLLMError(
            "rolling_log_likelihood needs a RoPE model: learned position embeddings cannot roll past the context "
            "(generation recomputes the window for them); score it with sliding windows instead."
        )
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise NanoLLMError(f"Need at least 2 tokens to score (the first has no context), got {ids.numel()}.")
    ids = ids.to(model.token_embedding.weight.device)
    cache = model.new_cache(1, rolling=True)
    context = model.config.context_length
    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64, device=ids.device)  # summed on the device: no sync per chunk
    try:
        for start in range(0, ids.numel() - 1, context):
            inputs = ids[start : min(start + context, ids.numel() - 1)]
            logits, _ = model(inputs[None], cache=cache)
            targets = ids[start + 1 : start + 1 + inputs.numel()]
            nll_sum += F.cross_entropy(logits[0].float(), targets, reduction="sum")
    finally:
        model.train(was_training)
    return nll_sum.item(), ids.numel() - 1


def generate_text(
    model: TransformerLanguageModel,
    tokenizer,
    prompt: str,
    max_length: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    beyond_context: str = "recompute",
) -> str:
    """The prompt followed by `max_length` sampled characters; the same seed gives the same text."""
    if not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "vocab_size"):
        raise NanoLLMError(f"tokenizer must be a CharTokenizer, got {type(tokenizer).__name__}.")
    if tokenizer.vocab_size > model.config.vocab_size:  # its extra characters would index past the embedding
        raise NanoLLMError(
            f"The tokenizer has {tokenizer.vocab_size} characters but the model's vocab_size is "
            f"{model.config.vocab_size}: use the tokenizer the model was trained with."
        )
    ids = generate_tokens(
        model,
        tokenizer.encode(prompt, what="The prompt"),
        max_length,
        temperature,
        top_k,
        make_generator(seed),
        use_cache,
        beyond_context,
    )
    return prompt + tokenizer.decode(list(ids))


def usable_prompt(tokenizer, prompt: str) -> str:
    """A configured sample prompt with characters outside the vocabulary dropped (never empty)."""
    return "".join(c for c in prompt if c in tokenizer.stoi) or tokenizer.chars[0]


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    elif isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= seed < 2**63:
        generator.manual_seed(int(seed))
    else:
        raise NanoLLMError(f"seed must be an integer >= 0, or None for a random one, got {seed!r}.")
    return generator
