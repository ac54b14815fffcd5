import pytest
import torch
import torch.nn.functional as F

from nanollm import CharTokenizer, ModelConfig, NanoLLMError, TransformerLanguageModel, generate_text
from nanollm.generation import (
    generate_batch,
    generate_steps,
    generate_tokens,
    make_generator,
    rolling_log_likelihood,
    sample_next,
)
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    tok = CharTokenizer.from_text("abcdefghij klmnop")
    config = ModelConfig(
        vocab_size=tok.vocab_size, embedding_dim=16, num_layers=2, num_heads=2, ffn_hidden_dim=32, context_length=24
    )
    model = TransformerLanguageModel(config)
    # Weights far from GPT-2's small init: the logits then depend strongly on the text before them, so a
    # path that reads the wrong context samples other characters (near-uniform logits would hide it).
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model, tok


def test_cache_and_no_cache_give_identical_text_past_the_context(model_and_tokenizer):
    model, tok = model_and_tokenizer
    # 60 new tokens with context 24: the window slides many times.
    with_cache = generate_text(model, tok, "abc", max_length=60, temperature=1.0, top_k=None, seed=3, use_cache=True)
    without = generate_text(model, tok, "abc", max_length=60, temperature=1.0, top_k=None, seed=3, use_cache=False)
    assert with_cache == without and len(with_cache) == 63


def test_same_seed_same_text_and_different_seed_differs(model_and_tokenizer):
    model, tok = model_and_tokenizer
    a = generate_text(model, tok, "ab", max_length=40, temperature=1.0, seed=1)
    b = generate_text(model, tok, "ab", max_length=40, temperature=1.0, seed=1)
    c = generate_text(model, tok, "ab", max_length=40, temperature=1.0, seed=2)
    assert a == b and a != c


@pytest.mark.parametrize("use_cache", [True, False])
def test_top_k_1_is_greedy_on_the_last_window(model_and_tokenizer, use_cache):
    # 40 new tokens with context 24: past it, each step must read exactly the last 24 tokens.
    model, tok = model_and_tokenizer
    ids = list(generate_tokens(model, tok.encode("ab"), 40, top_k=1, generator=make_generator(5), use_cache=use_cache))
    context = tok.encode("ab")
    for token in ids:
        logits, _ = model(torch.tensor([context[-24:]]))
        assert token == int(logits[0, -1].argmax())
        context.append(token)


def test_a_vanishing_temperature_is_greedy(model_and_tokenizer):
    # 1e-40 overflowed logits / temperature to inf, and the draw became token 0 again and again.
    model, tok = model_and_tokenizer
    greedy = generate_text(model, tok, "ab", max_length=30, top_k=1, seed=0)
    assert generate_text(model, tok, "ab", max_length=30, temperature=1e-40, seed=0) == greedy
    assert generate_text(model, tok, "ab", max_length=30, temperature=1e-40, top_k=1, seed=0) == greedy


def test_generation_leaves_training_mode_and_torch_settings_as_they_were(model_and_tokenizer):
    # One-token steps run on one thread without oneDNN; training and scoring need both back.
    model, tok = model_and_tokenizer
    model.train()
    threads = torch.get_num_threads()
    generate_text(model, tok, "a", max_length=3, seed=0)
    assert model.training
    assert torch.get_num_threads() == threads and torch.backends.mkldnn.enabled


@pytest.mark.parametrize("layers, threads_while_decoding", [(1, 1), (8, 2)])
def test_only_a_small_models_one_token_steps_run_on_one_thread(layers, threads_while_decoding):
    # 8 layers of width 64 and feed-forward 256: ~400K parameters, above SINGLE_THREAD_DECODING_BELOW.
    model = tiny_model(embedding_dim=64, num_layers=layers, ffn_hidden_dim=256)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        steps = generate_steps(model, [0], 1, 4)
        next(steps), next(steps)  # the prefill, then the first one-token step
        assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (threads_while_decoding, False)
        list(steps)
        assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (2, True)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_length": -1}, "max_new_tokens"), ({"temperature": 0}, "temperature"), ({"top_k": 0}, "top_k")],
)
def test_bad_sampling_settings_are_rejected(model_and_tokenizer, kwargs, message):
    model, tok = model_and_tokenizer
    with pytest.raises(NanoLLMError, match=message):
        generate_text(model, tok, "a", **{"max_length": 5, **kwargs})


def test_rolling_with_and_without_cache_give_identical_text_past_the_context(model_and_tokenizer):
    model, tok = model_and_tokenizer
    # Without a cache each step re-reads the rolling receptive field from scratch; a 60-character
    # prompt is longer than the context, so the cached path starts with a prefill past it too.
    prompt = ("abcdefghij klmnop" * 4)[:60]
    texts = [
        generate_text(model, tok, prompt, max_length=70, seed=3, use_cache=use_cache, beyond_context="rolling")
        for use_cache in (True, False)
    ]
    assert texts[0] == texts[1] and len(texts[0]) == 130


def sharp_model(tok: CharTokenizer) -> TransformerLanguageModel:
    """An untrained model with large weights: its choices depend strongly on the context, like a trained one."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tok.vocab_size, embedding_dim=16, num_layers=2, num_heads=2, ffn_hidden_dim=32, context_length=24
    )
    model = TransformerLanguageModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(8.0 if param.dim() > 1 else 1.0)
    return model


def test_rolling_goes_past_the_context_reproducibly_and_differs_from_recompute(model_and_tokenizer):
    _, tok = model_and_tokenizer
    model = sharp_model(tok)
    rolling = generate_text(model, tok, "abc", max_length=80, seed=4, beyond_context="rolling")
    assert rolling == generate_text(model, tok, "abc", max_length=80, seed=4, beyond_context="rolling")
    recompute = generate_text(model, tok, "abc", max_length=80, seed=4, beyond_context="recompute")
    # Within the context (24) both are the same computation; past it they part.
    assert rolling[:24] == recompute[:24] and rolling != recompute


def learned_model(tok: CharTokenizer) -> TransformerLanguageModel:
    return tiny_model(vocab_size=tok.vocab_size, position_encoding="learned")


def test_learned_positions_fall_back_to_recompute_when_asked_to_roll(model_and_tokenizer):
    _, tok = model_and_tokenizer
    model = learned_model(tok)
    texts = [
        generate_text(model, tok, "ab", max_length=30, seed=2, beyond_context=mode) for mode in ("rolling", "recompute")
    ]
    assert texts[0] == texts[1]


@pytest.mark.parametrize("beyond_context", ["recompute", "rolling"])
def test_batch_is_reproducible_and_one_sample_equals_generate_tokens(model_and_tokenizer, beyond_context):
    model, tok = model_and_tokenizer
    prompt = tok.encode("ab")
    settings = dict(temperature=0.9, top_k=6, beyond_context=beyond_context)
    batch = generate_batch(model, prompt, 4, 40, generator=make_generator(8), **settings)
    assert batch == generate_batch(model, prompt, 4, 40, generator=make_generator(8), **settings)
    assert len(batch) == 4 and all(len(sample) == 40 for sample in batch) and len({tuple(s) for s in batch}) > 1
    single = list(generate_tokens(model, prompt, 40, generator=make_generator(8), **settings))
    assert generate_batch(model, prompt, 1, 40, generator=make_generator(8), **settings) == [single]


def test_batched_greedy_samples_each_equal_the_greedy_text(model_and_tokenizer):
    model, tok = model_and_tokenizer
    greedy = list(generate_tokens(model, tok.encode("ab"), 40, top_k=1))
    assert generate_batch(model, tok.encode("ab"), 3, 40, top_k=1) == [greedy] * 3


@pytest.mark.parametrize("beyond_context", ["recompute", "rolling"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_the_history_moving_to_its_front_changes_no_token(model_and_tokenizer, monkeypatch, beyond_context, use_cache):
    # With room for 5 new tokens the history moves every 5 steps; the default room (HISTORY_CHUNK)
    # never fills in 70. A 60-character prompt is longer than the window: only its end is kept.
    import nanollm.generation as generation

    _, tok = model_and_tokenizer
    model = sharp_model(tok)
    prompt = tok.encode(("abcdefghij klmnop" * 4)[:60])
    settings = dict(top_k=6, use_cache=use_cache, beyond_context=beyond_context)
    texts = []
    for room in (generation.HISTORY_CHUNK, 5):
        monkeypatch.setattr(generation, "HISTORY_CHUNK", room)
        texts.append(generate_batch(model, prompt, 2, 70, generator=make_generator(3), **settings))
    assert texts[0] == texts[1]
    if beyond_context == "recompute":  # each step read exactly the last 24 tokens
        context = prompt.copy()
        for token in generate_tokens(model, prompt, 40, top_k=1, use_cache=use_cache):
            assert token == int(model(torch.tensor([context[-24:]]))[0][0, -1].argmax())
            context.append(token)


def test_a_long_request_streams_without_allocating_its_length(model_and_tokenizer):
    model, tok = model_and_tokenizer
    steps = generate_tokens(model, tok.encode("ab"), 10**15, generator=make_generator(0))
    assert len([next(steps) for _ in range(30)]) == 30  # 8 PB of history would fail at once
    steps.close()


def test_top_k_only_ever_picks_among_each_rows_k_most_likely():
    logits = torch.tensor([[2.0, 0.5, 1.5, -1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 1.5, 0.5, 2.0]])
    rows = logits.repeat(1000, 1)  # 2000 draws, the two orderings alternating
    picks = sample_next(rows, 1.0, 3, make_generator(0)).view(1000, 2)
    for row in range(2):
        top3 = set(torch.topk(logits[row], 3).indices.tolist())
        assert set(picks[:, row].tolist()) == top3  # all of the top 3 and nothing else


def test_low_temperature_concentrates_on_the_most_likely_token():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5]]).repeat(4000, 1)
    share = {t: (sample_next(logits, t, None, make_generator(1)) == 0).float().mean().item() for t in (0.1, 1.0, 5.0)}
    assert share[0.1] > 0.99
    assert abs(share[1.0] - torch.softmax(logits[0], -1)[0].item()) < 0.03  # temperature 1 keeps the model's odds
    assert share[5.0] < 0.32  # close to uniform (0.25)


def test_sampling_draws_what_torch_multinomial_draws():
    # Texts sampled before sample_next drew its own noise stay the same for the same seed.
    torch.manual_seed(0)
    for seed in range(200):
        logits = torch.randn(3, 57) * 3
        expected = torch.multinomial(torch.softmax(logits, -1), 1, generator=make_generator(seed))[:, 0]
        assert torch.equal(sample_next(logits, 1.0, None, make_generator(seed)), expected)


def test_noise_drawn_ahead_gives_the_text_and_generator_state_of_drawing_each_step(model_and_tokenizer, monkeypatch):
    import nanollm.generation as generation

    model, tok = model_and_tokenizer
    results = []
    for steps in (generation.NOISE_STEPS, 1):
        monkeypatch.setattr(generation, "NOISE_STEPS", steps)
        generator = make_generator(6)
        results.append((generate_batch(model, tok.encode("a"), 2, 150, generator=generator), generator.get_state()))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])


def test_rolling_log_likelihood_within_the_context_is_the_full_pass_cross_entropy(model_and_tokenizer):
    model, _ = model_and_tokenizer
    ids = torch.randint(0, model.config.vocab_size, (20,), generator=make_generator(0))
    logits, _ = model(ids[None, :-1])
    expected = F.cross_entropy(logits[0], ids[1:], reduction="sum").item()
    nll, count = rolling_log_likelihood(model, ids.tolist())
    assert count == 19 and abs(nll - expected) < 1e-4


def test_rolling_log_likelihood_past_the_context_scores_one_token_at_a_time(model_and_tokenizer):
    model, _ = model_and_tokenizer
    ids = torch.randint(0, model.config.vocab_size, (90,), generator=make_generator(1))
    cache = model.new_cache(rolling=True)
    with torch.no_grad():
        expected = sum(
            F.cross_entropy(model(ids[None, t : t + 1], cache=cache)[0][0], ids[t + 1 : t + 2], reduction="sum").item()
            for t in range(89)
        )
    nll, count = rolling_log_likelihood(model, ids)
    assert count == 89 and abs(nll - expected) < 1e-3


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m, t: generate_text(m, t, "a", max_length=5, beyond_context="sliding"),
            "beyond_context must be one of",
        ),
        (lambda m, t: generate_batch(m, t.encode("a"), 0, 5), "num_samples must be an integer >= 1"),
        (lambda m, t: rolling_log_likelihood(m, [1]), "Need at least 2 tokens"),
        (lambda m, t: rolling_log_likelihood(learned_model(t), [1, 2]), "needs a RoPE model"),
    ],
)
def test_bad_generation_arguments_are_named(model_and_tokenizer, call, message):
    model, tok = model_and_tokenizer
    with pytest.raises(NanoLLMError, match=message):
        call(model, tok)
