import torch

from nanollm import ModelConfig, TransformerLanguageModel


def tiny_model(**overrides) -> TransformerLanguageModel:
    settings = dict(vocab_size=11, embedding_dim=16, num_layers=2, num_heads=2, ffn_hidden_dim=32, context_length=16)
    return TransformerLanguageModel(ModelConfig(**{**settings, **overrides}))


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = tiny_model()
    idx = torch.randint(0, 11, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 11) and loss is None
    _, loss = model(idx, idx)
    # An untrained model is close to uniform: loss near ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(11.0)).item()) < 0.5


def test_changing_a_later_token_never_changes_earlier_logits():
    torch.manual_seed(0)
    model = tiny_model().eval()
    idx = torch.randint(0, 11, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 11
    before, _ = model(idx)
    after, _ = model(changed)
    assert torch.allclose(before[0, :10], after[0, :10], atol=1e-6)
    assert not torch.allclose(before[0, 10:], after[0, 10:])


def test_head_is_tied_and_parameters_counted_once():
    model = tiny_model()
    assert model.lm_head.weight is model.token_embedding.weight
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == expected_parameters(model.config)


def expected_parameters(c: ModelConfig) -> int:
    """Closed-form count: embeddings (head tied), per-block attention + FFN + norms, final norm."""
    per_block = 4 * c.embedding_dim * c.embedding_dim + 4 * c.embedding_dim  # qkv + proj
    per_block += 2 * c.embedding_dim * c.ffn_hidden_dim + c.ffn_hidden_dim + c.embedding_dim  # ffn
    per_block += 4 * c.embedding_dim  # two LayerNorms
    return (c.vocab_size + c.context_length) * c.embedding_dim + c.num_layers * per_block + 2 * c.embedding_dim


def test_kv_cache_gives_the_same_logits_as_a_full_pass():
    torch.manual_seed(0)
    model = tiny_model().eval()
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
