"""hwsi.train.tracking: `hwsi train --log-with` through accelerate's trackers, offline, files under the run folder;
the scalars read back from TensorBoard's event files and MLflow's file store are metrics.csv's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from hwsi.train.config import OptimConfig
from hwsi.train.engine import Engine


def _fit(stage_dir: Path, log_with: str, steps: int = 3):
    """A 3-step fit of a linear model (two terms beside the loss) with ``log_with``."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    xs = [torch.randn(4) for _ in range(8)]

    def step(m: nn.Module, batch: list[torch.Tensor]):
        y = m(torch.stack(batch)).squeeze(-1)
        a, b = (y**2).mean(), (y - 1).abs().mean()
        return a + b, {"L_a": float(a.detach()), "L_b": float(b.detach())}

    cfg = OptimConfig(max_steps=steps, batch_size=2, micro_batch_size=2, lr=0.1)
    return Engine(stage_dir, cfg, seed=0, progress=False, name="stage1", device="cpu", log_with=log_with).fit(
        model, xs, step)


def test_tensorboard_events_hold_the_logged_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit = _fit(tmp_path / "run" / "stage1", "tensorboard")
    events = list((tmp_path / "run" / "stage1" / "tb" / "hwsi").glob("events.out.tfevents.*"))
    assert events, list((tmp_path / "run" / "stage1").rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"stage1/loss", "stage1/lr", "stage1/L_a", "stage1/L_b"} <= set(acc.Tags()["scalars"])
    for key in ("loss", "lr", "L_a", "L_b"):
        got = [(e.step, e.value) for e in acc.Scalars(f"stage1/{key}")]
        want = [(int(r["step"]), float(r[key])) for r in fit.rows]
        assert [s for s, _ in got] == [1, 2, 3] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # float32 in the events
    assert len(set(fit.losses)) == 3


def test_mlflow_file_store_under_the_run_holds_the_logged_scalars(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fit = _fit(tmp_path / "run" / "stage1", "mlflow")
    store = tmp_path / "run" / "mlruns"
    assert store.is_dir()
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    exp = client.get_experiment_by_name("hwsi")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == ["stage1"]
    assert runs[0].data.params["lr"] == "0.1" and runs[0].data.params["batch_size"] == "2"
    for key in ("loss", "lr", "L_a", "L_b"):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, f"stage1/{key}"))
        assert hist == [(int(r["step"]), float(r[key])) for r in fit.rows]  # float64: exact


def test_log_with_none_writes_no_tracker_files_and_a_bad_value_is_one_line(tmp_path: Path, capsys) -> None:
    from hwsi.cli import main

    _fit(tmp_path / "stage1", "none")
    assert sorted(p.name for p in (tmp_path / "stage1").iterdir()) == ["checkpoints", "metrics.csv", "processes.json"]
    assert main(["train", "--stage", "1", "--config", "tiny", "--job", str(tmp_path), "--log-with", "comet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--log-with" in err[0] and "tensorboard, wandb, mlflow" in err[0], err
