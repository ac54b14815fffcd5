"""The optimizers and the learning-rate schedule: parameter groups, Muon beside AdamW as one optimizer
(steps, exact resume, schedule, clipping, changed settings), warm-up + cosine, and the config checks."""

import io
import json
import math
import re

import pytest
import torch
from omegaconf import OmegaConf

from nanollm import NanoLLMError
from nanollm.api import compose_config
from nanollm.config import validate_config
from nanollm.optim import MuonWithAdamW, WarmupCosine, apply_new_settings, build_optimizer, is_muon_group
from tests.conftest import assert_user_error, read_results, run_cli, run_script, tiny_model, train_args
from tests.test_reliability import assert_same_state, final_state

ADAMW = {
    "name": "adamw",
    "lr": 3e-3,
    "weight_decay": 0.1,
    "betas": [0.9, 0.99],
    "warmup_steps": 2,
    "min_lr_ratio": 0.1,
}
MUON = {
    **ADAMW,
    "name": "muon",
    "muon_lr": 0.02,
    "muon_weight_decay": 0.05,
    "momentum": 0.95,
    "nesterov": True,
    "ns_steps": 5,
}
VOCAB = 11


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (4, 9), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def train_step(model, optimizer, schedule, seed: int = 0) -> float:
    _, loss = model(*batch(seed))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    return float(loss.detach())


def names(model, params) -> set[str]:
    by_id = {id(p): name for name, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


HIDDEN = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "ffn.fc", "ffn.proj")}


# ---- AdamW --------------------------------------------------------------------------------------
def test_adamw_decays_matrices_and_embeddings_but_not_biases_or_norm_gains():
    model = tiny_model(position_encoding="learned")
    optimizer, _ = build_optimizer(model, ADAMW, max_steps=10)
    assert type(optimizer) is torch.optim.AdamW
    decay, no_decay = optimizer.param_groups
    assert names(model, decay["params"]) == HIDDEN | {"token_embedding.weight", "position_embedding.weight"}
    assert decay["weight_decay"] == 0.1
    assert names(model, no_decay["params"]) == {n for n, p in model.named_parameters() if p.dim() == 1}
    assert any(n.endswith("norm1.weight") for n in names(model, no_decay["params"]))  # norm gains
    assert any(n.endswith("qkv.bias") for n in names(model, no_decay["params"]))
    assert no_decay["weight_decay"] == 0.0


def test_a_config_without_a_name_is_adamw():
    """Checkpoints from before optim=muon store optim settings without `name`."""
    optimizer, _ = build_optimizer(tiny_model(), {k: v for k, v in ADAMW.items() if k != "name"}, max_steps=10)
    assert type(optimizer) is torch.optim.AdamW


# ---- the schedule -------------------------------------------------------------------------------
def test_warmup_cosine_rises_linearly_then_decays_to_min_ratio():
    schedule = WarmupCosine(warmup=10, max_steps=110, min_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1)  # 1 / warmup: the first step already moves
    assert schedule(5) == pytest.approx(0.55)
    assert schedule(10) == pytest.approx(1.0)  # the peak at the end of warm-up
    assert schedule(60) == pytest.approx(0.55)  # half-way down the cosine: (1 + min_ratio) / 2
    assert schedule(110) == pytest.approx(0.1)
    assert schedule(500) == pytest.approx(0.1)  # past max_steps it stays at the floor
    values = [schedule(step) for step in range(111)]
    assert all(a < b for a, b in zip(values[:10], values[1:11], strict=True))
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_continued_schedule_starts_where_the_old_stood_and_ends_at_the_new_floor():
    old = WarmupCosine(warmup=10, max_steps=110, min_ratio=0.1)
    new = old.continued(60, warmup=10, max_steps=210, min_ratio=0.1)
    assert new(60) == pytest.approx(old(60))  # no jump up (nor down) at the resumed step
    assert new(61) < new(60) and new(61) > old(61)  # decays on, more slowly towards the later end
    assert new.phase(60) == pytest.approx(old.phase(60))  # the cosine's phase continues
    assert new(135) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos((math.pi / 2 + math.pi) / 2)))
    assert new(210) == pytest.approx(0.1)
    assert new(300) == pytest.approx(0.1)
    lower = old.continued(60, warmup=10, max_steps=210, min_ratio=0.0)
    assert lower(60) == pytest.approx(old(60)) and lower(210) == pytest.approx(0.0)
    # Still warming up: the new warm-up takes over.
    assert old.continued(5, warmup=20, max_steps=210, min_ratio=0.1)(5) == pytest.approx(WarmupCosine(20, 210, 0.1)(5))


# ---- Muon beside AdamW --------------------------------------------------------------------------
@pytest.mark.parametrize("position_encoding", ["rope", "learned"])
def test_muon_takes_the_hidden_matrices_and_adamw_everything_else(position_encoding):
    model = tiny_model(position_encoding=position_encoding)
    optimizer, _ = build_optimizer(model, MUON, max_steps=10)
    assert isinstance(optimizer, MuonWithAdamW)
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one group
    decay, no_decay, muon = optimizer.param_groups
    embeddings = {"token_embedding.weight"} | (
        {"position_embedding.weight"} if position_encoding == "learned" else set()
    )
    assert names(model, decay["params"]) == embeddings  # the token embedding is also the (tied) LM head
    assert names(model, no_decay["params"]) == {n for n, p in model.named_parameters() if p.dim() == 1}
    assert names(model, muon["params"]) == HIDDEN
    assert [is_muon_group(g) for g in optimizer.param_groups] == [False, False, True]
    assert (decay["weight_decay"], no_decay["weight_decay"], muon["weight_decay"]) == (0.1, 0.0, 0.05)
    assert (muon["momentum"], muon["nesterov"], muon["ns_steps"]) == (0.95, True, 5)
    # The inner optimizers work on the very same group dicts and state.
    assert optimizer.adamw.param_groups[0] is decay and optimizer.muon.param_groups[0] is muon
    assert optimizer.adamw.state is optimizer.state and optimizer.muon.state is optimizer.state


def test_muon_refuses_flattened_weights_with_one_clear_error():
    """FSDP shards parameters into 1-D pieces; Muon would otherwise fail with a traceback."""
    model = tiny_model()
    model.blocks[0].attn.qkv.weight = torch.nn.Parameter(model.blocks[0].attn.qkv.weight.detach().flatten())
    with pytest.raises(NanoLLMError, match="whole weight matrices.*trainer=ddp"):
        build_optimizer(model, MUON, max_steps=10)


def test_one_muon_step_moves_every_parameter_and_training_lowers_the_loss():
    model = tiny_model()
    optimizer, schedule = build_optimizer(model, {**MUON, "lr": 1e-2}, max_steps=60)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = train_step(model, optimizer, schedule)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters()), "a parameter did not move"
    assert all("momentum_buffer" in optimizer.state[p] for p in optimizer.muon.param_groups[0]["params"])
    losses = [train_step(model, optimizer, schedule) for _ in range(59)]  # one fixed batch: overfit it
    assert losses[-1] < 0.4 * first, (first, losses[-1])


def saved(*objects) -> list:
    """state_dicts through torch.save and torch.load(weights_only=True), as a checkpoint stores them."""
    buffer = io.BytesIO()
    torch.save([o.state_dict() for o in objects], buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_muon_state_dict_resumes_bit_identically():
    model = tiny_model()
    optimizer, schedule = build_optimizer(model, MUON, max_steps=12)
    for step in range(4):  # through warm-up: momenta, AdamW moments and the schedule all have state
        train_step(model, optimizer, schedule, seed=step)
    model_state, optimizer_state, schedule_state = saved(model, optimizer, schedule)
    for step in range(4, 8):
        train_step(model, optimizer, schedule, seed=step)

    resumed = tiny_model()
    resumed.load_state_dict(model_state)
    resumed_optimizer, resumed_schedule = build_optimizer(resumed, MUON, max_steps=12)
    resumed_optimizer.load_state_dict(optimizer_state)
    resumed_schedule.load_state_dict(schedule_state)
    assert resumed_optimizer.muon.param_groups[0] is resumed_optimizer.param_groups[2]
    assert resumed_optimizer.adamw.state is resumed_optimizer.state is resumed_optimizer.muon.state
    for step in range(4, 8):
        train_step(resumed, resumed_optimizer, resumed_schedule, seed=step)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert saved(optimizer)[0]["param_groups"] == saved(resumed_optimizer)[0]["param_groups"]


def test_a_state_of_the_other_optimizer_is_refused_with_one_clear_error():
    """Resuming a run with the other optim= is a user's mistake: one line, no traceback."""
    adamw, _ = build_optimizer(tiny_model(), ADAMW, max_steps=10)
    muon, _ = build_optimizer(tiny_model(), MUON, max_steps=10)
    with pytest.raises(NanoLLMError, match="state is for optim=adamw, but this run uses optim=muon"):
        muon.load_state_dict(adamw.state_dict())
    with pytest.raises(NanoLLMError, match="state is for optim=muon, but this run uses optim=adamw"):
        adamw.load_state_dict(muon.state_dict())


def test_schedule_scales_muon_and_adamw_groups_from_their_own_peaks():
    model = tiny_model()
    optim = {**MUON, "warmup_steps": 2, "min_lr_ratio": 0.0}
    optimizer, schedule = build_optimizer(model, optim, max_steps=6)
    curve = WarmupCosine(2, 6, 0.0)
    for step in range(7):
        lrs = [group["lr"] for group in optimizer.param_groups]
        assert lrs == pytest.approx([3e-3 * curve(step), 3e-3 * curve(step), 0.02 * curve(step)])
        if step < 6:
            train_step(model, optimizer, schedule, seed=step)
    # At max_steps with min_lr_ratio=0 every rate is 0: no parameter moves, so the inner optimizers read the
    # scheduled rates (Muon's weight decay is scaled by its rate too).
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, optimizer, schedule, seed=6)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_norm_clipping_over_the_optimizer_parameters_clips_every_gradient():
    """Lightning clips the parameters of `optimizer.param_groups`: they must include Muon's."""
    model = tiny_model()
    optimizer, _ = build_optimizer(model, MUON, max_steps=10)
    _, loss = model(*batch())
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert torch.nn.utils.clip_grad_norm_(params, 1e-3) > 1e-3
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert float(total) == pytest.approx(1e-3, rel=1e-3)
    optimizer.step()


def test_new_settings_on_resume_set_both_rates_and_every_group_setting():
    model = tiny_model()
    optimizer, schedule = build_optimizer(model, MUON, max_steps=10)
    for step in range(5):
        train_step(model, optimizer, schedule, seed=step)
    changed = {**MUON, "lr": 1e-3, "muon_lr": 0.01, "weight_decay": 0.2, "muon_weight_decay": 0.3}
    changed.update(momentum=0.9, nesterov=False, ns_steps=3, betas=[0.8, 0.9])
    apply_new_settings(optimizer, schedule, changed, max_steps=20, step=5)
    multiplier = schedule.lr_lambdas[0](5)
    assert multiplier == pytest.approx(WarmupCosine(2, 10, 0.1)(5))  # the rate continues without a jump
    decay, no_decay, muon = optimizer.param_groups
    assert [g["lr"] for g in (decay, no_decay, muon)] == pytest.approx([1e-3 * multiplier] * 2 + [0.01 * multiplier])
    assert schedule.base_lrs == [1e-3, 1e-3, 0.01]
    assert (decay["weight_decay"], no_decay["weight_decay"], muon["weight_decay"]) == (0.2, 0.0, 0.3)
    assert decay["betas"] == no_decay["betas"] == (0.8, 0.9)
    assert (muon["momentum"], muon["nesterov"], muon["ns_steps"]) == (0.9, False, 3)
    assert optimizer.muon.param_groups[0] is muon
    train_step(model, optimizer, schedule, seed=5)
    expected = schedule.lr_lambdas[0](6)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * expected] * 2 + [0.01 * expected])


def test_new_settings_on_resume_keep_adamw_no_decay_group_undecayed():
    optimizer, schedule = build_optimizer(tiny_model(), ADAMW, max_steps=10)
    apply_new_settings(optimizer, schedule, {**ADAMW, "lr": 1e-3, "weight_decay": 0.3}, max_steps=20, step=0)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.3, 0.0]
    assert schedule.base_lrs == [1e-3, 1e-3]


def test_train_py_with_muon_trains_checkpoints_and_resumes(tmp_path):
    """Through Lightning: one optimizer, clipping, a weights_only checkpoint, a resume with changed settings."""
    first = run_cli("train.py", train_args(tmp_path, "optim=muon"))
    assert first.returncode == 0, first.stderr
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert [is_muon_group(g) for g in saved["optimizer_states"][0]["param_groups"]] == [False, False, True]
    # The checkpoint's optimizer is kept without optim=...; a changed Muon setting applies from step 20.
    resumed = run_cli("train.py", train_args(tmp_path, "ckpt_path=last", "trainer.max_steps=30", "+optim.muon_lr=0.01"))
    assert resumed.returncode == 0, resumed.stderr
    assert "optim.muon_lr: 0.003 -> 0.01" in resumed.stdout
    assert read_results(tmp_path / "run")["global_step"] == 30
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["lr_schedulers"][0]["base_lrs"] == [3e-3, 3e-3, 0.01]
    switched = run_cli("train.py", train_args(tmp_path, "ckpt_path=last", "trainer.max_steps=40", "optim=adamw"))
    assert_user_error(switched, "optim=muon, but this run uses optim=adamw", "init_from=")


def test_the_speedrun_preset_resumes_bit_exactly_and_its_checkpoints_generate_and_score(tmp_path):
    """experiment=speedrun_cpu as users run it (its model, Muon, decay to zero), shortened to 12 steps."""

    def speedrun(run: str, *extra: str) -> list[str]:
        return [
            "experiment=speedrun_cpu",
            "trainer.max_steps=12",
            "checkpoint_interval=4",
            "trainer.val_check_interval=6",
            "optim.warmup_steps=3",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={tmp_path / run}",
            f"outputs_dir={tmp_path / 'outputs'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            *extra,
        ]

    whole = run_cli("train.py", speedrun("whole"))
    assert whole.returncode == 0, whole.stderr
    # Stopped by SIGTERM during step 7, then the same command plus ckpt_path=last.
    fault = ["+callbacks.fault._target_=tests.faults.SignalAt", "+callbacks.fault.batch=7"]
    stopped = run_script("train.py", speedrun("split", *fault))
    assert stopped.returncode == 143, stopped.stderr
    resumed = run_cli("train.py", speedrun("split", "ckpt_path=last"))
    assert resumed.returncode == 0, resumed.stderr
    assert read_results(tmp_path / "split")["start_step"] == 7
    assert_same_state(final_state(tmp_path / "whole"), final_state(tmp_path / "split"))
    assert read_results(tmp_path / "split")["final_val_loss"] == read_results(tmp_path / "whole")["final_val_loss"]
    checkpoint = tmp_path / "split" / "checkpoints" / "checkpoint_final.ckpt"
    generated = run_cli("generate.py", [f"ckpt_path={checkpoint}", "max_new_tokens=20"])
    assert generated.returncode == 0 and len(generated.stdout.strip()) >= 20, generated.stderr
    scored = run_cli("eval.py", [f"ckpt_path={checkpoint}", f"output={tmp_path / 'eval.json'}"])
    assert scored.returncode == 0, scored.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["loss"] < 4.0  # untrained: ln(57) = 4.04


# ---- config -------------------------------------------------------------------------------------
def test_optim_muon_extends_adamw_and_passes_the_checks():
    cfg = compose_config(["optim=muon"])
    assert cfg.optim.name == "muon" and cfg.optim.muon_lr == cfg.optim.lr  # AdamW's scale (match_rms_adamw)
    assert {"betas", "weight_decay", "warmup_steps", "min_lr_ratio", "fused"} <= set(cfg.optim)
    validate_config(cfg)
    assert compose_config([]).optim.name == "adamw"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("name", "sgd", "optim.name must be one of adamw, muon"),
        ("muon_lr", 0, "optim.muon_lr must be a finite number > 0"),
        ("muon_lr", math.inf, "optim.muon_lr must be a finite number > 0"),
        ("muon_weight_decay", -0.1, "optim.muon_weight_decay must be a number >= 0"),
        ("momentum", 1.0, "optim.momentum must be a number in [0, 1)"),
        ("momentum", -0.5, "optim.momentum must be a number in [0, 1)"),
        ("ns_steps", 0, "optim.ns_steps must be an integer in [1, 100)"),
        ("ns_steps", 2.5, "optim.ns_steps must be an integer in [1, 100)"),
        ("ns_steps", 100, "optim.ns_steps must be an integer in [1, 100)"),  # torch's Muon refuses 100 or more
        ("nesterov", "yes", "optim.nesterov must be true or false"),
    ],
)
def test_bad_muon_settings_are_named(key, value, message):
    cfg = compose_config(["optim=muon"])
    OmegaConf.update(cfg, f"optim.{key}", value, merge=False)
    with pytest.raises(NanoLLMError, match=re.escape(message)):
        validate_config(cfg)
