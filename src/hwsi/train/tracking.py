"""Experiment tracking of a training stage through accelerate's trackers (``hwsi train --log-with``).

``log_with`` (``TrainConfig.log_with``, ``--log-with``): ``none`` (``metrics.csv`` only), ``tensorboard``, ``wandb``
or ``mlflow``; every one is offline by default and writes under the stage folder:

* ``tensorboard`` — event files in ``RUN/stageN/tb/hwsi/`` (``tensorboard --logdir RUN``);
* ``wandb`` — ``WANDB_MODE=offline`` unless the environment sets ``WANDB_MODE``; the run in ``RUN/stageN/wandb/``
  (``wandb sync`` uploads it later);
* ``mlflow`` — the file store ``RUN/mlruns`` (experiment ``hwsi``, one run per stage session named ``stageN``)
  unless the environment sets ``MLFLOW_TRACKING_URI`` (``mlflow ui --backend-store-uri RUN/mlruns``). MLflow 3
  refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE`` is true, so that is set too (where unset); a database
  store (``MLFLOW_TRACKING_URI=sqlite:///RUN/mlflow.db``) needs the full ``mlflow`` package (SQLAlchemy).

Each optimizer step logged to ``metrics.csv`` is logged as scalars ``stageN/loss``, ``stageN/lr`` and
``stageN/<term>`` at that step (main process only), with the stage's scalar hyper-parameters as the run's config.
The tracker's package is an optional dependency (``pip install 'hwsi[tracking]'`` for TensorBoard); a missing one is
a ConfigError naming the option. A resumed stage opens a new tracker run and logs from the checkpoint's step on.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from hwsi.errors import ConfigError

LogWith = Literal["none", "tensorboard", "wandb", "mlflow"]
LOG_WITH: tuple[str, ...] = ("none", "tensorboard", "wandb", "mlflow")
PROJECT = "hwsi"  # the tracker project / experiment name
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def check_log_with(log_with: str, what: str = "log_with") -> None:
    """``log_with`` is one of :data:`LOG_WITH` and its package is installed (else one ConfigError line)."""
    if log_with not in LOG_WITH:
        raise ConfigError(f"{what} must be {', '.join(LOG_WITH)}, got {log_with!r}")
    if log_with != "none" and not any(importlib.util.find_spec(p) for p in _PACKAGES[log_with]):
        raise ConfigError(f"{what} {log_with}: the {_PACKAGES[log_with][0]} package is not installed "
                          f"(pip install {_PACKAGES[log_with][0]})")


def accelerator_tracking(log_with: str, stage_dir: Path) -> dict[str, Any]:
    """The ``Accelerator`` keyword arguments of ``log_with`` (nothing for ``none``); sets the offline defaults of the
    module docstring in this process's environment where the user has not set them."""
    check_log_with(log_with)
    if log_with == "none":
        return {}
    from accelerate.utils import ProjectConfiguration

    if log_with == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    if log_with == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps it, "in maintenance mode"
        mlflow.set_tracking_uri(mlflow_store(stage_dir))  # in mlflow, not the environment: each run its own store
    return {"log_with": log_with,
            "project_config": ProjectConfiguration(project_dir=str(stage_dir), logging_dir=str(stage_dir / "tb"))}


def mlflow_store(stage_dir: Path) -> str:
    """The MLflow file store of a stage's run: ``RUN/mlruns`` (one store, a run per stage), as a ``file:`` URI."""
    return (Path(stage_dir).resolve().parent / "mlruns").as_uri()


def init_kwargs(log_with: str, stage_dir: Path, name: str) -> dict[str, Any]:
    """``Accelerator.init_trackers``' per-tracker arguments: the run named after the stage, files in the stage."""
    if log_with == "wandb":
        (stage_dir / "wandb").mkdir(parents=True, exist_ok=True)
        return {"wandb": {"dir": str(stage_dir), "name": name}}
    if log_with == "mlflow":
        return {"mlflow": {"run_name": name}}
    return {}


def hyperparameters(cfg: Any) -> dict[str, Any]:
    """The scalar fields of a stage's config dataclass (what every tracker accepts as a run config)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)
            if isinstance(getattr(cfg, f.name), (int, float, str, bool))}
