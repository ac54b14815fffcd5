"""The benchmark's yardstick: the same training in a bare PyTorch loop, with no Lightning.

Same model, batches, optimizer, schedule and clipping as `train.py`. As a whole process,
`python -m nanollm.bare --data FILE` runs the reference recipe the way nanoGPT's train.py does
(2000 steps; every 250 steps a 20-batch estimate of the training and validation loss) and then
prints, as JSON, when its training ended and the full-pass validation loss for the report. It
imports no Lightning, as nanoGPT does not; Hydra only composes its config (~0.2 s).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

# The classic CPU baby model (embedding 128, 4 layers, context 64, batch 12, 2000 steps, lr 1e-3).
REFERENCE = {
    "model.name": "reference",
    "model.embedding_dim": 128,
    "model.num_layers": 4,
    "model.num_heads": 4,
    "model.ffn_hidden_dim": 512,
    "model.context_length": 64,
    "model.dropout": 0.0,
    "data.batch_size": 12,
    "optim.lr": 1e-3,
    "trainer.max_steps": 2000,
}


def bare_loop(cfg, warmup: int, evaluate: bool = False, estimate_iters: int = 0, fused: bool = False) -> dict:
    """Train as `cfg` says in plain PyTorch: no Lightning, no logging, no checkpoints.

    `evaluate`: a full validation pass every trainer.val_check_interval steps; `estimate_iters`:
    nanoGPT's estimate instead, that many random batches of each split. `fused`: PyTorch's fused AdamW
    (train.py's default on CPUs too; nanoGPT uses it on CUDA only).
    """
    from nanollm.config import model_config_from
    from nanollm.corpus import prepare_corpus
    from nanollm.model import TransformerLanguageModel
    from nanollm.optim import build_optimizer
    from nanollm.windows import RandomWindows, SequentialWindows

    torch.manual_seed(cfg.seed)
    corpus = prepare_corpus(cfg.data.path, cfg.data.cache_dir)
    split = int(len(corpus.tokens) * (1 - cfg.data.val_fraction))
    train, val = corpus.tokens[:split], corpus.tokens[split:]
    context, batch_size = cfg.model.context_length, cfg.data.batch_size
    model = TransformerLanguageModel(model_config_from(cfg, corpus.tokenizer.vocab_size))
    optimizer, schedule = build_optimizer(model, cfg.optim, cfg.trainer.max_steps, fused=fused)
    max_steps = cfg.trainer.max_steps
    batches = iter(RandomWindows(train, context, batch_size, cfg.seed, 0, 0))
    val_loss = None
    started = t0 = time.perf_counter()
    for step in range(max_steps):
        if step == warmup:
            t0 = time.perf_counter()
        check = step % cfg.trainer.val_check_interval == 0
        if estimate_iters and check:  # nanoGPT estimates before the step, at step 0 too
            for part, seed in ((train, 1), (val, 2)):
                estimate = RandomWindows(part, context, batch_size, cfg.seed + seed, 0, step)
                evaluate_loss(model, (estimate.batch(step * estimate_iters + i) for i in range(estimate_iters)))
        x, y = next(batches)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        schedule.step()
        last = step + 1 == max_steps
        if evaluate and ((step + 1) % cfg.trainer.val_check_interval == 0 or last):
            val_loss = evaluate_loss(model, SequentialWindows(val, context, batch_size))
    t1 = time.perf_counter()
    return {
        "seconds": t1 - t0,
        "steps": max_steps - warmup,
        "total_seconds": t1 - started,
        "val_loss": val_loss,
        "model": model,
        "val_tokens": val,
    }


@torch.inference_mode()
def evaluate_loss(model, windows) -> float:
    """The mean loss over `windows`, weighted by tokens."""
    model.eval()
    total, count = 0.0, 0
    for x, y in windows:
        _, loss = model(x, y)
        total += float(loss) * y.numel()
        count += y.numel()
    model.train()
    return total / count


def main(argv: list[str] | None = None) -> None:
    from omegaconf import OmegaConf

    from nanollm.api import compose_config
    from nanollm.windows import SequentialWindows

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache-dir", default="data/cache")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-interval", type=int, default=250)
    parser.add_argument("--eval-iters", type=int, default=20)
    args = parser.parse_args(argv)
    cfg = compose_config([])
    values = {
        **REFERENCE,
        "trainer.max_steps": args.steps,
        "trainer.val_check_interval": args.eval_interval,
        "data.path": args.data,
        "data.cache_dir": args.cache_dir,
    }
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    result = bare_loop(cfg, warmup=0, estimate_iters=args.eval_iters)
    trained_until = time.time()  # the run ends here; the full pass below is for the report only
    windows = SequentialWindows(np.asarray(result["val_tokens"]), cfg.model.context_length, 128)
    full_pass = evaluate_loss(result["model"], windows)
    print(json.dumps({"trained_until_unix_time": trained_until, "val_loss": full_pass}))


if __name__ == "__main__":
    main()
