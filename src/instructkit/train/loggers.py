"""Metrics loggers: where the loop's rows go. One small interface (`log(row)`, `flush()`,
`close()`) and its backends:

    jsonl         metrics.jsonl in the run folder, always (the run's own record: plots, resume and
                  the other commands read it); rewritten whole and atomically at each flush
    tensorboard   event files in the run folder: `tensorboard --logdir runs/` shows every run
    wandb         Weights & Biases (`pip install wandb`; WANDB_MODE=offline keeps it on disk)
    mlflow        MLflow (`pip install mlflow`): MLFLOW_TRACKING_URI, else RUN/mlflow.db (SQLite)

A row is a step's (kind "step": loss, lr, seconds, tokens) or an evaluation's (kind "eval":
train_loss, val_loss and the objective's other metrics). The other backends see the numbers as
scalars named `train/NAME` (steps; `train/tokens_per_s` from the step's real tokens and seconds)
and `eval/NAME` (evaluations), at the optimizer step. On resume, rows already logged stay;
TensorBoard hides what the killed process wrote after the checkpoint's step.
"""

from __future__ import annotations

from pathlib import Path

from instructkit.errors import UserError
from instructkit.runs import RunFolder
from instructkit.train.config import log_names

_NOT_SCALARS = ("kind", "step", "epoch", "skipped")


def scalars(row: dict) -> dict[str, float]:
    """The row's numbers, named for a dashboard: train/... for a step, eval/... for an evaluation."""
    prefix = "train" if row["kind"] == "step" else "eval"
    values = {f"{prefix}/{name}": float(value) for name, value in row.items()
              if name not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}
    if row["kind"] == "step" and row.get("real_tokens") and row.get("seconds"):
        values["train/tokens_per_s"] = row["real_tokens"] / row["seconds"]
    return values


class MetricsLogger:
    """The interface: `log` each row as it is made; `flush` at each evaluation (rows must be on
    disk by then); `close` once at the end (also after a failure)."""

    def log(self, row: dict) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


class JsonlLogger(MetricsLogger):
    """metrics.jsonl: every row of the run, the restored ones first."""

    def __init__(self, run: RunFolder, rows: list[dict]):
        self.run, self.rows = run, list(rows)

    def log(self, row: dict) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        self.run.write_metrics(self.rows)


class TensorBoardLogger(MetricsLogger):
    def __init__(self, run: RunFolder, step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events the killed process wrote after the checkpoint are hidden, not doubled.
        self.writer = SummaryWriter(log_dir=str(run.path), purge_step=step + 1 if step else None)

    def log(self, row: dict) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, global_step=row["step"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(MetricsLogger):
    def __init__(self, run: RunFolder, config: dict):
        import wandb

        self.wandb = wandb
        self.handle = wandb.init(project="instructkit", name=Path(run.path).resolve().name, dir=str(run.path),
                                 config=config, reinit=True)

    def log(self, row: dict) -> None:
        self.handle.log(scalars(row), step=row["step"])

    def close(self) -> None:
        self.handle.finish()


class MlflowLogger(MetricsLogger):
    def __init__(self, run: RunFolder, config: dict):
        import os

        import mlflow

        self.mlflow = mlflow
        if "MLFLOW_TRACKING_URI" not in os.environ:  # MLflow's own default store, in the run folder
            mlflow.set_tracking_uri(f"sqlite:///{Path(run.path).resolve() / 'mlflow.db'}")
        self.handle = mlflow.start_run(run_name=Path(run.path).resolve().name)
        mlflow.log_params({name: str(value)[:250] for name, value in config.items()})

    def log(self, row: dict) -> None:
        self.mlflow.log_metrics(scalars(row), step=row["step"])

    def close(self) -> None:
        self.mlflow.end_run()


class Loggers(MetricsLogger):
    """Every logger of a run as one: each row goes to all of them."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    def log(self, row: dict) -> None:
        for logger in self.loggers:
            logger.log(row)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def open_loggers(log: str | None, run: RunFolder, config: dict, state: dict, *, main: bool = True) -> Loggers:
    """The loggers `log` names (comma list, see config.LOGGERS) after metrics.jsonl, for rank 0
    (`main`); the other ranks log nothing. A backend that is not installed is a one-line error."""
    if not main:
        return Loggers([])
    opened: list = [JsonlLogger(run, state["rows"])]
    for name in log_names(log):
        try:
            __import__(PACKAGES[name])
        except ImportError:
            raise UserError(f"--log {name}: the {PACKAGES[name]} package is not installed "
                            f"(pip install {PACKAGES[name]})") from None
        if name == "tensorboard":
            opened.append(TensorBoardLogger(run, state["step"]))
        elif name == "wandb":
            opened.append(WandbLogger(run, config))
        else:
            opened.append(MlflowLogger(run, config))
    return Loggers(opened)
