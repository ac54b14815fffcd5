"""What goes to each experiment logger beyond scalars: text samples, and the hyperparameters with the
final metrics, each where that logger supports it (Lightning's loggers differ in both)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

# The optional extra each tracker needs, for the error when it is missing.
EXTRAS = {"MLFlowLogger": "mlflow", "WandbLogger": "wandb"}


def log_text_sample(logger: Logger, text: str, step: int) -> None:
    """A generated sample: TensorBoard's Text tab, an MLflow artifact, a W&B table, or samples.md beside metrics.csv."""
    if isinstance(logger, TensorBoardLogger):
        # A Markdown code block keeps line breaks and spacing as generated.
        logger.experiment.add_text("samples/text", "```\n" + text + "\n```", global_step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_text(logger.run_id, text, f"samples/step_{step:07d}.txt")
    elif isinstance(logger, WandbLogger):
        logger.log_text(key="samples", columns=["step", "text"], data=[[step, text]])
    elif isinstance(logger, CSVLogger):
        path = Path(logger.log_dir) / "samples.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"## step {step}\n\n```\n{text}\n```\n\n")


def log_final(logger: Logger, params: dict, metrics: dict, step: int) -> None:
    """Hyperparameters with the final metrics, so a tracker's table compares the runs of a sweep."""
    if isinstance(logger, TensorBoardLogger):
        logger.log_hyperparams(params, metrics)  # the HParams tab pairs them
    else:
        logger.log_hyperparams(params)
        logger.log_metrics(metrics, step=step)
    logger.finalize("success")
