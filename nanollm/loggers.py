"""What goes to each experiment logger beyond scalars: text samples, and the hyperparameters with the
final metrics, each where that logger supports it (Lightning's loggers differ in both)."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

# The optional extra each tracker needs, for the error when it is missing.
EXTRAS = {"MLFlowLogger": "mlflow", "WandbLogger": "wandb"}


class ContinuingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to its metrics.csv: Lightning's writer
    deletes an existing file, and with it every row the run logged before it was interrupted."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


class _ContinuingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Keep the file; its columns are the keys rows are appended under (new ones rewrite the header).
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = list(csv.DictReader(handle).fieldnames or [])


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
