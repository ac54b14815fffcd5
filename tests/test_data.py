import numpy as np
import pytest
import torch

from nanollm import NanoLLMError
from nanollm.corpus import EncodedCorpus
from nanollm.data import CharDataModule

TEXT = "".join(chr(97 + (i * 7) % 26) for i in range(2000))


def make_module(**kwargs) -> CharDataModule:
    settings = dict(corpus=EncodedCorpus.from_text(TEXT), context_length=16, batch_size=4, seed=7)
    module = CharDataModule(**{**settings, **kwargs})
    module.setup()
    return module


def first_batches(module: CharDataModule, n: int):
    iterator = iter(module.train_dataloader())
    return [next(iterator) for _ in range(n)]


def test_split_is_contiguous_90_10():
    module = make_module()
    assert len(module.train_tokens) == 1800 and len(module.val_tokens) == 200
    assert np.array_equal(np.concatenate([module.train_tokens, module.val_tokens]), module.corpus.tokens)


def test_windows_are_shifted_targets_with_the_real_batch_size():
    x, y = first_batches(make_module(batch_size=5), 1)[0]
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_batches_are_deterministic_under_the_seed_and_resume_exactly():
    run = first_batches(make_module(), 6)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(run, first_batches(make_module(), 6), strict=True))
    assert not torch.equal(run[0][0], first_batches(make_module(seed=8), 1)[0][0])
    resumed = make_module()
    resumed.load_state_dict({"batches_served": 4})
    assert all(torch.equal(a[0], b[0]) for a, b in zip(run[4:], first_batches(resumed, 2), strict=True))


def test_validation_covers_the_split_once():
    module = make_module()
    batches = list(module.val_dataloader())
    assert sum(x.shape[0] for x, _ in batches) == (200 - 1) // 16


def test_text_shorter_than_context_is_rejected():
    with pytest.raises(NanoLLMError, match="context_length"):
        make_module(context_length=500)


@pytest.mark.parametrize("cache", [True, False])
def test_directory_is_read_through_the_glob(tmp_path, cache):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "main.py").write_text("print('hello')\n" * 10, encoding="utf-8")
    (tmp_path / "code" / "notes.txt").write_text("not code\n" * 10, encoding="utf-8")
    cache_dir = tmp_path / "cache" if cache else None
    module = CharDataModule(path=tmp_path / "code", glob="*.py", cache_dir=cache_dir, context_length=8, batch_size=2)
    module.prepare_data()
    module.setup()
    assert module.corpus.tokenizer.decode(module.corpus.tokens) == "print('hello')\n" * 10


def test_validation_is_split_between_processes_and_a_limit_spreads_it_over_the_split():
    from nanollm.windows import SequentialWindows

    tokens = np.arange(1001) % 50
    every = [s for rank in (0, 1) for s in SequentialWindows(tokens, 10, 4, rank, 2).starts()]
    assert sorted(every) == list(range(0, 1000, 10))  # both processes together: each window once
    limited = SequentialWindows(tokens, 10, 4, limit=5)
    assert list(limited.starts()) == [0, 250, 500, 740, 990] and len(limited) == 25  # len: the full pass
    assert sum(x.shape[0] for x, _ in limited) == 5
    limited.limit = None  # lifted for a run's last validation
    assert sum(x.shape[0] for x, _ in limited) == 100


def test_dropout_masks_differ_between_micro_batches_and_processes_but_repeat_on_resume():
    from nanollm.module import dropout_seed

    seeds = {dropout_seed(1337, rank, index) for rank in range(4) for index in range(1000)}
    assert len(seeds) == 4000  # every (rank, batch index) its own masks
    assert dropout_seed(1337, 1, 7) == dropout_seed(1337, 1, 7) != dropout_seed(1338, 1, 7)


def test_each_micro_batch_of_an_accumulated_step_draws_its_own_dropout_masks():
    from types import SimpleNamespace

    from nanollm.module import LanguageModelModule

    module = LanguageModelModule(
        model_config={"vocab_size": 5, "embedding_dim": 8, "num_heads": 2, "dropout": 0.1}, optim={}
    )

    def draw(global_step: int, batch_idx: int, rank: int = 0) -> float:
        module._trainer = SimpleNamespace(accumulate_grad_batches=2, global_step=global_step, global_rank=rank)
        module.on_train_batch_start(None, batch_idx)
        return torch.rand(()).item()

    first, second = draw(3, 6), draw(3, 7)  # the two micro-batches of optimizer step 4
    assert first != second and draw(3, 6, rank=1) != first
    assert draw(3, 0) == first  # batch_idx restarts after a resume: the same index, the same masks
