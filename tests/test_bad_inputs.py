"""The bad-input catalogue: every user mistake, through the real entry points.

Each case must exit non-zero with exactly one `error:` line naming the problem, print no
traceback, and leave every file that existed before untouched. The cases run the entry points'
`__main__` in this process (`run_cli`, the same code as `python train.py ...`); a few also run
as a subprocess, to show the two agree.
"""

import math
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from nanollm import (
    CharTokenizer,
    NanoLLMError,
    TransformerLanguageModel,
    generate_text,
    load_checkpoint,
    set_seed,
    train_with_config,
)
from tests.conftest import SAMPLE, assert_user_error, run_cli, run_script, train_args


def crafted(source: Path, target: Path, change) -> None:
    """A copy of a good checkpoint with `change(checkpoint)` applied: it still loads safely."""
    checkpoint = torch.load(source, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, target)


def _nan_weights(checkpoint):
    checkpoint["state_dict"]["model.final_norm.weight"][0] = math.nan


def _learned_positions(checkpoint):
    model = checkpoint["nanollm"]["model"]
    model["position_encoding"] = "learned"
    shape = (model["context_length"], model["embedding_dim"])
    checkpoint["state_dict"]["model.position_embedding.weight"] = torch.zeros(shape)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, trained_run):
    """Bad data files, copies of a finished run and crafted checkpoints, shared by the cases."""
    ws = tmp_path_factory.mktemp("bad")
    (ws / "empty.txt").write_text("", encoding="utf-8")
    (ws / "one.txt").write_text("a", encoding="utf-8")
    (ws / "short.txt").write_text("just a few words here", encoding="utf-8")
    (ws / "binary.txt").write_bytes(b"ok text \x80\x81 more")
    (ws / "no_text").mkdir()
    (ws / "no_text" / "notes.md").write_text("not a .txt file", encoding="utf-8")
    shutil.copytree(trained_run, ws / "done")
    shutil.copytree(trained_run, ws / "other")
    good = trained_run / "checkpoints" / "last.ckpt"
    (ws / "damaged.ckpt").write_bytes(good.read_bytes()[:5000])
    torch.save({"state_dict": {}, "epoch": 0}, ws / "foreign.ckpt")
    crafted(good, ws / "unknown_key.ckpt", lambda c: c["nanollm"]["model"].update(mixture_of_experts=8))
    crafted(good, ws / "no_model.ckpt", lambda c: c["nanollm"].pop("model"))
    crafted(good, ws / "nan.ckpt", _nan_weights)
    crafted(good, ws / "absurd.ckpt", lambda c: c["nanollm"]["model"].update(embedding_dim=2**30, num_heads=2))
    crafted(good, ws / "learned.ckpt", _learned_positions)
    (ws / "random.ckpt").write_bytes(random.Random(0).randbytes(5000))
    os.mkfifo(ws / "fifo.ckpt")
    shutil.copytree(trained_run / "checkpoints", ws / "sweep" / "0" / "checkpoints")  # a sweep directory's job
    (ws / "no_best").mkdir()
    (ws / "new_letters.txt").write_text("Only new letters: ÆØÅ æøå " * 100, encoding="utf-8")
    return ws


def snapshot(root: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


DONE = "{ws}/done/checkpoints/last.ckpt"
MALFORMED = {  # checkpoints that load safely but cannot be used: each named with its problem
    "unknown model key": ("unknown_key.ckpt", ["unknown_key.ckpt", "unknown model settings", "mixture_of_experts"]),
    "no model record": ("no_model.ckpt", ["no_model.ckpt", "no model record"]),
    "NaN weights": ("nan.ckpt", ["nan.ckpt", "NaN/Inf weights", "earlier checkpoint"]),
    "absurd sizes": ("absurd.ckpt", ["absurd.ckpt", "inconsistent", "embedding_dim"]),
}
# torch's own message for such bytes spans lines and advises weights_only=False, which could run code.
RANDOM_BYTES = ["random.ckpt", "damaged or not a checkpoint file"]
TRAIN_CASES = {
    # data
    "missing file": (["data.path={ws}/missing.txt"], ["missing.txt", "does not exist"]),
    "empty file": (["data.path={ws}/empty.txt"], ["Token sequence must have at least 2 tokens"]),
    "one character": (["data.path={ws}/one.txt"], ["Token sequence must have at least 2 tokens"]),
    "binary file": (["data.path={ws}/binary.txt"], ["binary.txt", "not valid UTF-8", "offset 8"]),
    "shorter than context": (["data.path={ws}/short.txt"], ["context_length"]),
    "directory without text": (["data.path={ws}/no_text"], ["no files matching '**/*.txt'", "data.glob"]),
    "cache directory under a file": (["data.cache_dir={ws}/one.txt/cache"], ["data.cache_dir", "Not a directory"]),
    "device file as data": (["data.path=/dev/null"], ["/dev/null", "not a regular file or a directory"]),
    # values
    "heads do not divide width": (
        ["model.num_heads=3"],
        ["model.embedding_dim (16)", "model.num_heads (3)", "e.g. model.num_heads=2 or model.embedding_dim=18."],
    ),
    "zero width": (["model.embedding_dim=0"], ["model.embedding_dim", "positive integer"]),
    "negative layers": (["model.num_layers=-1"], ["model.num_layers"]),
    "zero context": (["model.context_length=0"], ["model.context_length"]),
    "dropout 1": (["model.dropout=1.0"], ["model.dropout", "[0, 1)"]),
    "negative dropout": (["model.dropout=-0.1"], ["model.dropout"]),
    "text as dropout": (["model.dropout=abc"], ["model.dropout", "'abc'"]),
    "unknown position encoding": (["model.position_encoding=alibi"], ["model.position_encoding", "rope, learned"]),
    "unknown activation": (["model.activation=relu"], ["model.activation", "gelu, gelu_tanh"]),
    "odd head size with rope": (
        ["model.embedding_dim=18", "model.num_heads=2"],
        ["even head size", "model.position_encoding=learned"],
    ),
    "zero learning rate": (["optim.lr=0"], ["optim.lr", "> 0"]),
    "negative learning rate": (["optim.lr=-0.001"], ["optim.lr"]),
    "infinite learning rate": (["optim.lr=inf"], ["optim.lr must be a finite number > 0", "inf"]),
    "betas outside [0, 1)": (["optim.betas=[2,2]"], ["optim.betas[0]", "[0, 1)"]),
    "negative final learning rate": (["optim.min_lr_ratio=-1"], ["optim.min_lr_ratio", "[0, 1]"]),
    "zero batch": (["data.batch_size=0"], ["data.batch_size", ">= 1"]),
    "zero steps": (["trainer.max_steps=0"], ["trainer.max_steps", ">= 1"]),
    "zero accumulation": (["trainer.accumulate_grad_batches=0"], ["trainer.accumulate_grad_batches", ">= 1"]),
    "NaN clipping": (["trainer.gradient_clip_val=nan"], ["trainer.gradient_clip_val", "nan"]),
    "text where a number goes": (["model.num_layers=two"], ["model.num_layers"]),
    "negative seed": (["seed=-5"], ["seed", "-5"]),
    "keep no checkpoints": (["checkpoint_keep=0"], ["checkpoint_keep", ">= 1"]),
    "zero sample temperature": (["sample.temperature=0"], ["sample.temperature", "> 0"]),
    "zero sample top_k": (["sample.top_k=0"], ["sample.top_k", ">= 1"]),
    "negative sample length": (["sample.max_new_tokens=-1"], ["sample.max_new_tokens", ">= 0"]),
    "unknown sample beyond_context": (["sample.beyond_context=slide"], ["sample.beyond_context", "recompute, rolling"]),
    "null sample prompt": (["sample.prompt=null"], ["sample.prompt must be text", "None", 'sample.prompt="1e3"']),
    "number as sample prompt": (["sample.prompt=123"], ["sample.prompt must be text", "123"]),
    "text as early-stopping patience": (
        ["callbacks=early_stopping", "callbacks.early_stopping.patience=abc"],
        ["callbacks.early_stopping.patience", ">= 0", "'abc'"],
    ),
    "negative early-stopping patience": (
        ["callbacks=early_stopping", "callbacks.early_stopping.patience=-1"],
        ["callbacks.early_stopping.patience", "-1"],
    ),
    "text as early-stopping min_delta": (
        ["callbacks=early_stopping", "callbacks.early_stopping.min_delta=abc"],
        ["callbacks.early_stopping.min_delta", "'abc'"],
    ),
    "text as early-stopping threshold": (
        ["callbacks=early_stopping", "callbacks.early_stopping.stopping_threshold=abc"],
        ["callbacks.early_stopping.stopping_threshold", "'abc'", "null"],
    ),
    # Requests the allocator refuses at once (petabytes): they fail fast without using memory.
    "batch beyond memory": (["data.batch_size=1000000000000000"], ["out of memory", "data.batch_size"]),
    "model beyond memory": (["model.ffn_hidden_dim=100000000000000"], ["out of memory", "smaller model"]),
    # Hydra and Lightning
    "unknown preset": (["model=huge"], ["unknown model 'huge'", "nano"]),
    "unknown trainer": (["trainer=tpu"], ["unknown trainer 'tpu'"]),
    "unknown logger in a list": (["logger=[csv,bogus]"], ["unknown logger 'bogus'", "csv, many", "tensorboard"]),
    "unknown key": (["foo=1"], ["unknown config key 'foo'", "+foo="]),
    "unquoted comma": (["sample.prompt=Hi,", "you?"], ["could not parse the override", "quote"]),
    "comma in a value": (["sample.prompt=Hi, you?"], ["has a comma", 'sample.prompt="Hi, you?"']),
    "bogus precision": (["trainer.precision=bogus"], ["Precision 'bogus' is invalid", "trainer"]),
    "unknown compile mode": (["compile=fast"], ["compile must be", "'fast'", "reduce-overhead"]),
    "GPU accelerator without a GPU": (["trainer.accelerator=gpu"], ["no CUDA GPU", "trainer.accelerator=cpu"]),
    "FSDP without a GPU": (["trainer=fsdp"], ["no CUDA GPU", "trainer.accelerator=cpu"]),
    # checkpoints
    "missing checkpoint": (["ckpt_path={ws}/nope.ckpt"], ["nope.ckpt", "does not exist"]),
    "damaged checkpoint": (["ckpt_path={ws}/damaged.ckpt"], ["damaged.ckpt", "damaged"]),
    "random bytes as checkpoint": (["ckpt_path={ws}/random.ckpt"], RANDOM_BYTES),
    "text file as checkpoint": ([f"ckpt_path={SAMPLE}"], ["sample.txt", "not a checkpoint"]),
    "foreign checkpoint": (["ckpt_path={ws}/foreign.ckpt"], ["foreign.ckpt", "not a nanollm checkpoint"]),
    "other architecture": (
        [f"ckpt_path={DONE}", "model.embedding_dim=32", "model.num_heads=4"],
        ["different architecture", "model.embedding_dim (checkpoint 16, config 32)"],
    ),
    "no best checkpoint anywhere": (
        ["ckpt_path=best", "outputs_dir={ws}/no_best"],
        ["ckpt_path=best found no best.ckpt"],
    ),
    "new text for a resume": (
        [f"ckpt_path={DONE}", "data.path={ws}/new_letters.txt", "trainer.max_steps=40"],
        ["different character set", "init_from="],
    ),
    "init_from a missing file": (["init_from={ws}/nope.ckpt"], ["nope.ckpt", "does not exist"]),
    "init_from a text file": ([f"init_from={SAMPLE}"], ["sample.txt", "not a checkpoint"]),
    "init_from and ckpt_path": ([f"init_from={DONE}", f"ckpt_path={DONE}"], ["init_from and ckpt_path", "Keep one"]),
    **{f"resume from {k}": ([f"ckpt_path={{ws}}/{f}"], m) for k, (f, m) in MALFORMED.items()},
    "init_from NaN weights": (["init_from={ws}/nan.ckpt"], MALFORMED["NaN weights"][1]),
    # run directories
    "checkpoint_dir is a file": (["checkpoint_dir={ws}/one.txt"], ["checkpoint_dir", "is a file"]),
    "run directory under a file": (["hydra.run.dir={ws}/one.txt/run"], ["one.txt"]),
    "new run over an old one": (["hydra.run.dir={ws}/done"], ["already holds checkpoints", "ckpt_path=last"]),
    # Its checkpoints elsewhere, the run would still replace that run's results.json.
    "new run in another run's directory": (
        ["hydra.run.dir={ws}/done", "checkpoint_dir={ws}/elsewhere"],
        ["{ws}/done' holds another run's results.json", "another directory"],
    ),
    "a list as experiment_name": (["experiment_name=[a,b]"], ["experiment_name must be a name", "['a', 'b']"]),
    "outputs_dir null": (["outputs_dir=null"], ["outputs_dir must be a directory path", "None"]),
    "text as a patience": (
        ["callbacks.training_health.patience=abc"],
        ["callbacks.training_health refused its settings", "patience must be an integer >= 1", "abc"],
    ),
    "unknown early-stopping mode": (
        ["callbacks=early_stopping", "callbacks.early_stopping.mode=bogus"],
        ["callbacks.early_stopping refused its settings", "bogus"],
    ),
    "resuming another run into this run's directory": (
        ["hydra.run.dir={ws}/done", "ckpt_path={ws}/other/checkpoints/last.ckpt"],
        ["holds checkpoints of another run", "hydra.run.dir={ws}/other ckpt_path=last"],
    ),
    "resuming a finished run": (
        ["hydra.run.dir={ws}/done", "ckpt_path=last"],
        ["is at step 20", "nothing left to train", "larger trainer.max_steps"],
    ),
    "a changed resume of an earlier checkpoint over the later ones": (
        ["hydra.run.dir={ws}/done", "ckpt_path={ws}/done/checkpoints/checkpoint_step_10.ckpt", "optim.lr=0.01"],
        ["checkpoint_step_10.ckpt", "later checkpoints", "optim.lr", "new run directory"],
    ),
}
GENERATE_CASES = {
    "no checkpoint given": ([], ["ckpt_path is required"]),
    "a FIFO as checkpoint": (["ckpt_path={ws}/fifo.ckpt"], ["fifo.ckpt", "not a regular file"]),  # it blocked forever
    "a run directory as checkpoint": (["ckpt_path={ws}/done"], ["is a directory", "e.g. {ws}/done/checkpoints/"]),
    # It suggested <sweep>/last.ckpt, which does not exist.
    "a sweep directory as checkpoint": (["ckpt_path={ws}/sweep"], ["e.g. {ws}/sweep/0/checkpoints/last.ckpt"]),
    "a directory without checkpoints": (["ckpt_path={ws}/no_text"], ["no checkpoints in it", "ckpt_path=last"]),
    "outputs_dir null": (["ckpt_path=last", "outputs_dir=null"], ["outputs_dir must be a directory path"]),
    "missing checkpoint": (["ckpt_path={ws}/nope.ckpt"], ["does not exist"]),
    "damaged checkpoint": (["ckpt_path={ws}/damaged.ckpt"], ["damaged"]),
    "random bytes as checkpoint": (["ckpt_path={ws}/random.ckpt"], RANDOM_BYTES),
    "foreign checkpoint": (["ckpt_path={ws}/foreign.ckpt"], ["not a nanollm checkpoint"]),
    **{k: ([f"ckpt_path={{ws}}/{f}"], m) for k, (f, m) in MALFORMED.items()},
    "unseen prompt characters": ([f"ckpt_path={DONE}", "prompt='Zq~'"], ["prompt", "never saw", "'~'"]),
    "negative max_new_tokens": ([f"ckpt_path={DONE}", "max_new_tokens=-1"], ["max_new_tokens", ">= 0"]),
    "zero temperature": ([f"ckpt_path={DONE}", "temperature=0"], ["temperature", "> 0"]),
    "negative temperature": ([f"ckpt_path={DONE}", "temperature=-1"], ["temperature"]),
    "NaN temperature": ([f"ckpt_path={DONE}", "temperature=nan"], ["temperature", "nan"]),
    "zero top_k": ([f"ckpt_path={DONE}", "top_k=0"], ["top_k", ">= 1"]),
    "text seed": ([f"ckpt_path={DONE}", "seed=abc"], ["seed", "'abc'"]),
    "CUDA without a GPU": ([f"ckpt_path={DONE}", "device=cuda"], ["device=cuda", "no CUDA GPU", "device=cpu"]),
    "unknown beyond_context": ([f"ckpt_path={DONE}", "beyond_context=slide"], ["beyond_context", "recompute, rolling"]),
    "unknown key": ([f"ckpt_path={DONE}", "promt=x"], ["unknown config key 'promt'"]),
    "null prompt": ([f"ckpt_path={DONE}", "prompt=null"], ["prompt must be text", "None", "quote"]),
    "number as prompt": ([f"ckpt_path={DONE}", "prompt=1e3"], ["prompt must be text", "1000.0", 'prompt="1e3"']),
    "true as prompt": ([f"ckpt_path={DONE}", "prompt=true"], ["prompt must be text", "True"]),
    "text as use_cache": ([f"ckpt_path={DONE}", "use_cache=no"], ["use_cache", "true or false", "'no'"]),
    # Requests the allocator refuses at once (petabytes): they fail fast without using memory.
    "samples beyond memory": (
        [f"ckpt_path={DONE}", "num_samples=1000000000000000", "max_new_tokens=5"],
        ["out of memory", "num_samples"],
    ),
    "samples too long for memory": (
        [f"ckpt_path={DONE}", "num_samples=2", "max_new_tokens=1000000000000000"],
        ["out of memory", "max_new_tokens"],
    ),
}
EVAL_CASES = {
    "no checkpoint given": ([], ["ckpt_path is required"]),
    "missing checkpoint": (["ckpt_path={ws}/nope.ckpt"], ["nope.ckpt", "does not exist"]),
    "foreign checkpoint": (["ckpt_path={ws}/foreign.ckpt"], ["not a nanollm checkpoint"]),
    "random bytes as checkpoint": (["ckpt_path={ws}/random.ckpt"], RANDOM_BYTES),
    "text file as checkpoint": ([f"ckpt_path={SAMPLE}"], ["sample.txt", "not a checkpoint"]),
    "unseen characters": ([f"ckpt_path={DONE}", "data.path={ws}/new_letters.txt"], ["'Æ'", "eval.unknown=skip"]),
    "one character": ([f"ckpt_path={DONE}", "data.path={ws}/one.txt"], ["at least 2"]),
    "stride past the context": ([f"ckpt_path={DONE}", "eval.stride=33"], ["eval.stride", "(32)"]),
    "a FIFO as checkpoint": (["ckpt_path={ws}/fifo.ckpt"], ["fifo.ckpt", "not a regular file"]),
    "outputs_dir null": (["ckpt_path=last", "outputs_dir=null"], ["outputs_dir must be a directory path"]),
    "zero stride": ([f"ckpt_path={DONE}", "eval.stride=0"], ["eval.stride"]),
    "unknown eval.unknown": ([f"ckpt_path={DONE}", "eval.unknown=drop"], ["eval.unknown", "error, skip"]),
    "unknown eval.method": ([f"ckpt_path={DONE}", "eval.method=beam"], ["eval.method", "windows, rolling"]),
    "no best checkpoint anywhere": (["ckpt_path=best", "outputs_dir={ws}/no_best"], ["found no best.ckpt"]),
    **{k: ([f"ckpt_path={{ws}}/{f}"], m) for k, (f, m) in MALFORMED.items()},
    "empty data.path": ([f"ckpt_path={DONE}", "data.path="], ["data.path is empty"]),
    "device file as data": ([f"ckpt_path={DONE}", "data.path=/dev/null"], ["not a regular file or a directory"]),
    "output over an existing file": (
        [f"ckpt_path={DONE}", "output={ws}/one.txt"],
        ["output '{ws}/one.txt' already exists", "new file name"],
    ),
    "rolling on learned positions": (
        ["ckpt_path={ws}/learned.ckpt", "eval.method=rolling"],
        ["learned.ckpt", "learned position", "eval.method=windows"],
    ),
}
# Run as real subprocesses too: the in-process runner must not hide what a new process shows.
IN_A_SUBPROCESS = {"train: unknown preset", "train: zero accumulation", "generate: NaN weights", "eval: one character"}


def cases():
    for script, table in (("train.py", TRAIN_CASES), ("generate.py", GENERATE_CASES), ("eval.py", EVAL_CASES)):
        for name, (args, fragments) in table.items():
            case_id = f"{script.removesuffix('.py')}: {name}"
            yield pytest.param(script, args, fragments, case_id in IN_A_SUBPROCESS, id=case_id)


@pytest.mark.parametrize("script, args, fragments, in_subprocess", list(cases()))
def test_bad_input_fails_with_one_clear_line_and_touches_nothing(
    workspace, tmp_path, monkeypatch, script, args, fragments, in_subprocess
):
    args = [a.format(ws=workspace) for a in args]
    before = snapshot(workspace)
    if script == "train.py":
        args = train_args(tmp_path, *args)
    # Every case sees a machine without a GPU, as CI's is: the "without a GPU" cases hold on one with a GPU too.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    if in_subprocess:
        result = run_script(script, args, env_extra={"CUDA_VISIBLE_DEVICES": ""})
    else:
        result = run_cli(script, args)
    assert_user_error(result, *(f.format(ws=workspace) for f in fragments))
    after = snapshot(workspace)
    assert {path: after.get(path) for path in before} == before  # every existing file is untouched
    assert not list(tmp_path.rglob("*.ckpt"))


def _sizes(vocab_size: int, num_heads: int) -> dict:
    return dict(
        vocab_size=vocab_size, embedding_dim=16, num_layers=1, num_heads=num_heads, ffn_hidden_dim=32, context_length=32
    )


def test_api_bad_inputs_raise_one_clear_error(workspace, tmp_path):
    tokenizer = CharTokenizer.from_text("abcdef")
    model = TransformerLanguageModel(
        vocab_size=6, embedding_dim=16, num_layers=1, num_heads=2, ffn_hidden_dim=32, context_length=8
    )
    larger = TransformerLanguageModel(
        vocab_size=9, embedding_dim=16, num_layers=1, num_heads=2, ffn_hidden_dim=32, context_length=8
    )
    run_dir = {"checkpoint_dir": str(tmp_path)}
    before = snapshot(workspace)
    done = workspace / "done/checkpoints/last.ckpt"  # a TINY run on the sample: 57 characters, width 16, 2 heads
    four_heads = TransformerLanguageModel(**_sizes(57, 4))  # that run's weight shapes, another architecture
    cases = [
        (lambda: train_with_config(model, [0, 1] * 50, {**run_dir, "learnin_rate": 5}), "Unknown config key.*learnin"),
        (lambda: train_with_config(model, [0, 1] * 50, {**run_dir, "embedding_dim": 64}), "embedding_dim.*64.*16"),
        (lambda: train_with_config(model, [0, 1] * 50 + [2**32 + 3], run_dir), "Token id 4294967299 is outside"),
        (lambda: train_with_config(model, [0, 1] * 50, {**run_dir, "learning_rate": math.inf}), "finite number"),
        (lambda: train_with_config(None, [0, 1] * 50, run_dir), "model must be a nanollm"),
        (lambda: train_with_config(model, [0, 1] * 50, run_dir, resume_from=done), "Cannot resume.*vocab_size=57"),
        (lambda: load_checkpoint(done, four_heads), r"checkpoint's settings: num_heads=2 \(this model has 4\)"),
        (lambda: generate_text(model, CharTokenizer.from_text("abcdefgh"), "abc", 5), "tokenizer has 8 characters"),
        (lambda: generate_text(model, None, "abc", 5), "tokenizer must be a CharTokenizer"),
        (
            lambda: load_checkpoint(
                done, TransformerLanguageModel(**_sizes(57, 2)), torch.optim.AdamW(model.parameters())
            ),
            "optimizer does not match",
        ),
        (lambda: set_seed(-1), r"seed must be an integer in \[0, 2\*\*32\)"),
        (lambda: set_seed("a"), "seed must be an integer"),
        (lambda: tokenizer.decode([1.7]), "Token ids must be integers, got 1.7"),
        (lambda: tokenizer.decode("01"), "decode takes a sequence of token ids, got str"),
        (lambda: CharTokenizer.from_text(None), "from_text takes the text as a str"),
        (lambda: train_with_config(model, [1], run_dir), "at least 2 tokens"),
        (lambda: train_with_config(model, [0, 1, 2] * 3, run_dir), "context_length"),
        (lambda: train_with_config(model, [0, 9] * 50, run_dir), "outside the model's vocabulary"),
        (lambda: train_with_config(model, [0, 1] * 50, {**run_dir, "learning_rate": -1}), "optim.lr"),
        (lambda: train_with_config(model, [0, 1] * 50, {**run_dir, "seed": -1}), "seed"),
        # A tokenizer smaller than the model: its checkpoints would crash generation later.
        (lambda: train_with_config(larger, [0, 1] * 50, run_dir, tokenizer=tokenizer), "vocab_size=tokenizer"),
        (lambda: load_checkpoint(workspace / "damaged.ckpt", model), "damaged"),
        # The runbook hard-codes vocab_size=42: the error names the checkpoint's own settings.
        (
            lambda: load_checkpoint(done, model),
            r"different shape.*checkpoint's settings: vocab_size=\d+ \(this model has 6\)",
        ),
        # The runbook's config_nano after its Quick Start: the same checkpoint_dir, which holds that run.
        (
            lambda: train_with_config(model, [0, 1] * 50, {"checkpoint_dir": str(workspace / "done/checkpoints")}),
            r"already holds checkpoints of another run: continue that run with resume_from='.*\.ckpt', or train "
            r"this one in another config\['checkpoint_dir'\]",
        ),
        (lambda: generate_text(model, tokenizer, "xyz", max_length=5), "never saw"),
        (lambda: generate_text(model, tokenizer, "abc", max_length=5, temperature=0), "temperature"),
        (lambda: CharTokenizer().encode("abc"), "build_vocab"),
        (lambda: generate_text(model, tokenizer, "abc", max_length=5, temperature=math.nan), "temperature"),
        (lambda: generate_text(model, tokenizer, "abc", max_length=5, temperature=math.inf), "temperature"),
        (lambda: generate_text(model, tokenizer, "abc", max_length=5, seed=-1), "seed"),
        (lambda: generate_text(model, tokenizer, "abc", max_length=5, seed="x"), "seed"),
        (lambda: generate_text(model, tokenizer, "abc", max_length=5, top_k=True), "top_k"),
        (lambda: generate_text(model, tokenizer, None, max_length=5), "prompt must be a string"),
        (lambda: generate_text(model, tokenizer, 5, max_length=5), "prompt must be a string"),
        (lambda: train_with_config(model, [0, 1] * 50, {"checkpoint_dir": None}), "checkpoint_dir"),
        (lambda: train_with_config(model, [0, 1] * 50, None), "config must be a dict"),
        (lambda: load_checkpoint(None, model), "checkpoint file path"),
        (lambda: CharTokenizer.load(workspace / "short.txt"), "not a vocabulary file"),
        (lambda: tokenizer.decode([9999]), "9999"),
        (lambda: tokenizer.decode([-1]), "-1"),
    ]
    for call, message in cases:
        with pytest.raises(NanoLLMError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert not list(tmp_path.rglob("*.ckpt"))
    assert snapshot(workspace) == before


def test_an_unreadable_data_file_is_named_before_training(tmp_path, monkeypatch):
    # As root (CI) permissions do not bind, so the answer a file without read permission gives is stood in for.
    from nanollm import corpus

    monkeypatch.setattr(corpus.os, "access", lambda path, mode: not str(path).endswith("sample.txt"))
    assert_user_error(run_cli("train.py", train_args(tmp_path)), "Cannot read", "sample.txt", "chmod +r")
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_checkpoint_dir_that_refuses_files_is_named_before_training(tmp_path, monkeypatch):
    # As root (CI) permissions do not bind, so the refusal a read-only directory gives is stood in for.
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    model = TransformerLanguageModel(vocab_size=2, embedding_dim=16, num_layers=1, num_heads=2, context_length=8)
    with pytest.raises(NanoLLMError, match="Cannot write into checkpoint_dir .*Permission denied"):
        train_with_config(model, [0, 1] * 50, {"checkpoint_dir": str(tmp_path / "ckpts"), "num_steps": 2})
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize(
    "err, out_of_memory",
    [
        (MemoryError("Unable to allocate 7.11 PiB for an array"), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB."), True),  # a GPU's
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes."), True),
        (RuntimeError("shape '[2, 3]' is invalid for input of size 5"), False),  # a bug keeps its traceback
    ],
)
def test_only_failed_allocations_count_as_out_of_memory(err, out_of_memory):
    from nanollm.cli import is_out_of_memory

    assert is_out_of_memory(err) == out_of_memory
