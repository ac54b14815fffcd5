from functools import partial

import pytest
import torch
import torch.nn.functional as F

from nanollm import ModelConfig, NanoLLMError, TransformerLanguageModel
from tests.conftest import tiny_model as seeded_tiny_model

# conftest's seeded model in evaluation mode, with room for the 16-token sequences these tests feed.
tiny_model = partial(seeded_tiny_model, context_length=16)


def test_forward_shapes_and_loss():
    model = tiny_model()
    idx = torch.randint(0, 11, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 11) and loss is None
    _, loss = model(idx, idx)
    # An untrained model is close to uniform: loss near ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(11.0)).item()) < 0.5


def test_changing_a_later_token_never_changes_earlier_logits():
    model = tiny_model()
    idx = torch.randint(0, 11, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 11
    before, _ = model(idx)
    after, _ = model(changed)
    assert torch.allclose(before[0, :10], after[0, :10], atol=1e-6)
    assert not torch.allclose(before[0, 10:], after[0, 10:])


@pytest.mark.parametrize("position_encoding", ["rope", "learned"])
def test_head_is_tied_and_parameters_counted_once(position_encoding):
    model = tiny_model(position_encoding=position_encoding)
    assert model.lm_head.weight is model.token_embedding.weight
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == expected_parameters(model.config)


def expected_parameters(c: ModelConfig) -> int:
    """Closed-form count: embeddings (head tied), per-block attention + FFN + norms, final norm."""
    per_block = 4 * c.embedding_dim * c.embedding_dim + 4 * c.embedding_dim  # qkv + proj
    per_block += 2 * c.embedding_dim * c.ffn_hidden_dim + c.ffn_hidden_dim + c.embedding_dim  # ffn
    per_block += 4 * c.embedding_dim  # two LayerNorms
    positions = c.context_length * c.embedding_dim if c.position_encoding == "learned" else 0  # RoPE has none
    return c.vocab_size * c.embedding_dim + positions + c.num_layers * per_block + 2 * c.embedding_dim


def test_rope_scores_depend_on_relative_positions_only():
    from nanollm.model import apply_rotary, rotary_table

    torch.manual_seed(0)
    rotation = torch.view_as_complex(rotary_table(context_length=40, head_dim=8))
    q, k = torch.randn(8), torch.randn(8)
    score = lambda i, j: apply_rotary(q, rotation[i]) @ apply_rotary(k, rotation[j])  # noqa: E731
    assert torch.allclose(score(7, 3), score(30, 26), atol=1e-5)  # same distance, same score
    assert not torch.allclose(score(7, 3), score(7, 5), atol=1e-3)
    assert torch.allclose(apply_rotary(q, rotation[9]).norm(), q.norm(), atol=1e-5)  # a rotation
    assert torch.equal(apply_rotary(q, rotation[0]), q)  # position 0 is not turned


def test_rotary_tables_are_not_saved_and_follow_the_model_dtype():
    model = tiny_model()
    assert not any("rotary" in key or "position" in key for key in model.state_dict())
    logits, _ = model.to(torch.float64)(torch.randint(0, 11, (1, 5)))
    assert logits.dtype == torch.float64


def test_config_saved_before_a_key_existed_loads_with_its_old_meaning():
    saved = dict(vocab_size=11, embedding_dim=16, num_layers=2, num_heads=2, ffn_hidden_dim=32, context_length=16)
    assert ModelConfig.from_saved(saved).position_encoding == "learned"
    assert ModelConfig.from_saved({**saved, "position_encoding": "rope"}).position_encoding == "rope"
    assert ModelConfig(**saved).position_encoding == "rope"
    assert ModelConfig.from_saved(saved).activation == "gelu_tanh"
    assert ModelConfig.from_saved({**saved, "activation": "gelu"}).activation == "gelu"
    assert ModelConfig(**saved).activation == "gelu"


def test_activation_picks_the_feed_forward_non_linearity():
    x = torch.randn(2, 8, 16)
    outputs = {}
    for activation, approximate in (("gelu", "none"), ("gelu_tanh", "tanh")):
        ffn = tiny_model(activation=activation).blocks[0].ffn  # seeded: the same weights for both
        outputs[activation] = ffn(x)
        assert torch.equal(outputs[activation], ffn.proj(F.gelu(ffn.fc(x), approximate=approximate)))
    assert not torch.equal(outputs["gelu"], outputs["gelu_tanh"])  # the same weights, another function


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(position_encoding="alibi"), "model.position_encoding must be one of rope, learned"),
        (dict(embedding_dim=18, num_heads=6), "needs an even head size"),
        (dict(activation="relu"), "model.activation must be one of gelu, gelu_tanh"),
        (dict(activation=["gelu"]), "model.activation must be one of gelu, gelu_tanh"),
    ],
)
def test_bad_position_encoding_settings_are_named(overrides, message):
    with pytest.raises(NanoLLMError, match=message):
        tiny_model(**overrides)


@pytest.mark.parametrize("position_encoding", ["rope", "learned"])
def test_kv_cache_gives_the_same_logits_as_a_full_pass(position_encoding):
    model = tiny_model(position_encoding=position_encoding)
    idx = torch.randint(0, 11, (1, 12))
    full, _ = model(idx)
    cache = model.new_cache()
    prefill, _ = model(idx[:, :5], cache=cache)
    steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 12)]
    cached = torch.cat([prefill, *steps], dim=1)
    assert torch.allclose(full, cached, atol=1e-5)


def test_tiny_model_overfits_a_short_text():
    torch.manual_seed(0)
    text = "the cat sat on the mat. " * 4
    chars = sorted(set(text))
    ids = torch.tensor([[chars.index(c) for c in text]])
    model = TransformerLanguageModel(
        vocab_size=len(chars),
        embedding_dim=32,
        num_layers=2,
        num_heads=4,
        ffn_hidden_dim=64,
        context_length=ids.size(1) - 1,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def through_cache(model: TransformerLanguageModel, idx: torch.Tensor, cache, prefill: int = 1) -> torch.Tensor:
    """Logits of `idx` fed through `cache`: the first `prefill` tokens at once, then one at a time."""
    first, _ = model(idx[:, :prefill], cache=cache)
    steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(prefill, idx.size(1))]
    return torch.cat([first, *steps], dim=1)


@pytest.mark.parametrize(
    "position_encoding, activation", [("rope", "gelu"), ("learned", "gelu"), ("rope", "gelu_tanh")]
)
def test_one_token_steps_are_bit_identical_to_the_module_path(position_encoding, activation):
    # decode_one (eval) re-implements the blocks for speed; training mode with no dropout runs the modules.
    model = tiny_model(position_encoding=position_encoding, activation=activation)
    idx = torch.randint(0, 11, (3, 16))
    logits = [through_cache(model.train(training), idx, model.new_cache(3), prefill=4) for training in (False, True)]
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("rolling", [False, True])
def test_multi_token_chunks_through_the_cache_match_a_full_pass(rolling):
    model = tiny_model()
    idx = torch.randint(0, 11, (2, 16))
    full, _ = model(idx)
    cache = model.new_cache(batch_size=2, rolling=rolling)
    chunks = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 5), (5, 12), (12, 16))]
    assert torch.allclose(full, torch.cat(chunks, dim=1), atol=1e-5)


def test_rolling_cache_matches_a_full_pass_within_the_context():
    model = tiny_model()
    idx = torch.randint(0, 11, (1, 16))
    full, _ = model(idx)
    assert torch.allclose(full, through_cache(model, idx, model.new_cache(rolling=True), prefill=3), atol=1e-5)


def test_one_layer_rolling_cache_past_the_context_equals_the_window():
    # With one layer the next token depends only on the last context_length tokens and how far apart
    # they are (RoPE), so a rolling cache must give exactly the full pass over that window.
    model = tiny_model(num_layers=1)
    idx = torch.randint(0, 11, (1, 60))
    rolled = through_cache(model, idx, model.new_cache(rolling=True))
    for t in (16, 31, 32, 47, 59):  # past the context, on and off the ring's wrap-around
        window, _ = model(idx[:, t - 15 : t + 1])
        assert torch.allclose(rolled[0, t], window[0, -1], atol=1e-5), t


def test_rolling_cache_one_token_at_a_time_equals_chunks_and_one_pass():
    model = tiny_model()
    idx = torch.randint(0, 11, (2, 57))
    one_by_one = through_cache(model, idx, model.new_cache(batch_size=2, rolling=True))
    cache = model.new_cache(batch_size=2, rolling=True)
    chunks = torch.cat([model(idx[:, t : t + 7], cache=cache)[0] for t in range(0, 57, 7)], dim=1)
    # Forty tokens in one pass (past the context), then one at a time from what the ring kept.
    mostly_whole = through_cache(model, idx, model.new_cache(batch_size=2, rolling=True), prefill=40)
    assert torch.allclose(one_by_one, chunks, atol=1e-5)
    assert torch.allclose(one_by_one, mostly_whole, atol=1e-5)
    # Past the context the deeper layer sees further back than the window: not a sliding full pass.
    window, _ = model(idx[:, 57 - 16 :])
    assert (one_by_one[:, -1] - window[:, -1]).abs().max() > 1e-4  # float error is ~1e-7


def test_rotation_past_the_table_turns_by_the_absolute_position():
    from nanollm.model import rotary_turn

    model = tiny_model()
    cache = model.new_cache(rolling=True)
    head_dim = 16 // 2
    for position in (0, 5, 16, 23, 1000, 123456):
        rotation = model.rotation(position, 1, cache)[0, :, 0]  # (3, D/2)
        expected = rotary_turn(position, head_dim)
        assert torch.allclose(rotation[0], expected, atol=1e-5) and torch.allclose(rotation[1], expected, atol=1e-5)
        assert torch.equal(rotation[2], torch.ones_like(expected))  # values are not turned


def test_a_batch_through_the_cache_gives_each_sequence_its_own_logits():
    model = tiny_model()
    idx = torch.randint(0, 11, (3, 40))
    batched = through_cache(model, idx, model.new_cache(batch_size=3, rolling=True), prefill=6)
    for row in range(3):
        alone = through_cache(model, idx[row : row + 1], model.new_cache(rolling=True), prefill=6)
        assert torch.allclose(batched[row], alone[0], atol=1e-5)


@pytest.mark.parametrize("position_encoding", ["rope", "learned"])
def test_last_only_gives_the_last_positions_logits_of_a_full_pass(position_encoding):
    model = tiny_model(position_encoding=position_encoding)
    idx = torch.randint(0, 11, (2, 16))
    full, _ = model(idx)
    last, _ = model(idx, last_only=True)
    assert last.shape == (2, 1, 11) and torch.allclose(last, full[:, -1:], atol=1e-5)
    with pytest.raises(NanoLLMError, match="last_only"):
        model(idx, idx, last_only=True)


def test_last_only_through_a_rolling_cache_past_the_context_still_caches_every_position():
    # Past the context the last query must see only the window the mask allows, and the cache must
    # still hold every position's keys: the steps after it give what they give after a full chunk.
    model = tiny_model()
    idx = torch.randint(0, 11, (1, 44))
    caches = [model.new_cache(rolling=True) for _ in range(2)]
    chunk = [model(idx[:, :40], cache=c, last_only=last)[0] for c, last in zip(caches, (False, True), strict=True)]
    assert torch.allclose(chunk[1], chunk[0][:, -1:], atol=1e-5)
    after = [through_cache(model, idx[:, 40:], cache) for cache in caches]
    assert torch.allclose(after[0], after[1], atol=1e-5)


def test_cache_limits_are_named():
    model = tiny_model()
    with pytest.raises(NanoLLMError, match="exceeds the model's context_length"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.new_cache()
    model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(NanoLLMError, match="rolling=True"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(NanoLLMError, match="rolling KV cache needs model.position_encoding=rope"):
        tiny_model(position_encoding="learned").new_cache(rolling=True)
