import pytest
import torch

from nanollm import CharTokenizer, ModelConfig, NanoLLMError, TransformerLanguageModel, generate_text
from nanollm.generation import generate_tokens, make_generator


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    tok = CharTokenizer.from_text("abcdefghij klmnop")
    config = ModelConfig(
        vocab_size=tok.vocab_size, embedding_dim=16, num_layers=2, num_heads=2, ffn_hidden_dim=32, context_length=24
    )
    return TransformerLanguageModel(config), tok


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


def test_top_k_1_is_greedy(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ids = list(generate_tokens(model, tok.encode("ab"), 10, top_k=1, generator=make_generator(5)))
    context = tok.encode("ab")
    for token in ids:
        logits, _ = model(torch.tensor([context[-24:]]))
        assert token == int(logits[0, -1].argmax())
        context.append(token)


def test_generation_leaves_training_mode_as_it_was(model_and_tokenizer):
    model, tok = model_and_tokenizer
    model.train()
    generate_text(model, tok, "a", max_length=3, seed=0)
    assert model.training


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_length": -1}, "max_new_tokens"), ({"temperature": 0}, "temperature"), ({"top_k": 0}, "top_k")],
)
def test_bad_sampling_settings_are_rejected(model_and_tokenizer, kwargs, message):
    model, tok = model_and_tokenizer
    with pytest.raises(NanoLLMError, match=message):
        generate_text(model, tok, "a", **{"max_length": 5, **kwargs})
