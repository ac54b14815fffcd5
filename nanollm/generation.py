"""Sampling from a TransformerLanguageModel: temperature, top-k, a seed, and the KV cache."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nanollm.errors import NanoLLMError
from nanollm.model import TransformerLanguageModel


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    """Reject sampling settings that have no meaning, with the fix in the message."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise NanoLLMError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise NanoLLMError(f"temperature must be > 0, got {temperature!r} (use top_k=1 for greedy decoding).")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise NanoLLMError(f"top_k must be an integer >= 1 or null, got {top_k!r}.")


@torch.inference_mode()
def generate_tokens(
    model: TransformerLanguageModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time (so callers can stream them).

    The model sees at most its last `context_length` tokens. With the cache, each new token costs
    one single-token forward pass; once the text outgrows the context the window slides, every
    position shifts, and the cache is rebuilt from the window, so both paths give the same tokens.
    """
    check_sampling_args(max_new_tokens, temperature, top_k)
    if not prompt_ids:
        raise NanoLLMError("The prompt is empty: give at least one character, e.g. prompt='The '.")
    was_training = model.training
    model.eval()
    device = model.token_embedding.weight.device
    context = model.config.context_length
    tokens = list(prompt_ids)
    cache = model.new_cache() if use_cache else None
    pending = tokens[-context:]  # tokens not yet seen by the cache
    threads = torch.get_num_threads()
    try:
        for step in range(max_new_tokens):
            if step == 1 and cache is not None and device.type == "cpu":
                # Single-token steps are too small to gain from intra-op threads on a CPU; they only add
                # synchronisation (measured ~8% faster with one thread). The prefill above used them all.
                torch.set_num_threads(1)
            if cache is not None and cache.length + len(pending) > context:
                cache.length, pending = 0, tokens[-context:]
            window = pending if cache is not None else tokens[-context:]
            idx = torch.tensor([window], dtype=torch.long, device=device)
            logits, _ = model(idx, cache=cache)
            next_id = sample_next(logits[0, -1], temperature, top_k, generator)
            tokens.append(next_id)
            pending = [next_id]
            yield next_id
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    """Draw one token id from the last position's logits."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_k == 1:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits, dim=-1)
    # Sample on the CPU so a seed gives the same text whatever device the model is on.
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate_text(
    model: TransformerLanguageModel,
    tokenizer,
    prompt: str,
    max_length: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> str:
    """The prompt followed by `max_length` sampled characters; the same seed gives the same text."""
    ids = generate_tokens(
        model,
        tokenizer.encode(prompt, what="The prompt"),
        max_length,
        temperature,
        top_k,
        make_generator(seed),
        use_cache,
    )
    return prompt + tokenizer.decode(list(ids))


def usable_prompt(tokenizer, prompt: str) -> str:
    """A configured sample prompt with characters outside the vocabulary dropped (never empty)."""
    return "".join(c for c in prompt if c in tokenizer.stoi) or tokenizer.chars[0]


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(int(seed))
    else:
        generator.seed()
    return generator
