"""hwsi.train.loader: training data through a torch DataLoader with workers, in the engine's exact order; the loader
draws nothing from the global random streams, so stage-1 losses are the same with 0 or 2 workers, resumed or not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from hwsi.train.config import OptimConfig
from hwsi.train.engine import Engine, epoch_order
from hwsi.train.loader import StepBatchSampler, step_loader
from hwsi.train.stages import run_stage
from test_train import make_job, tiny_config
from test_train_resume import _losses


def _plan(engine: Engine, n: int):
    batch, per_epoch = engine.batch_plan(n)

    def plan(s: int) -> list[list[int]]:
        e, pos = divmod(s, per_epoch)
        return engine._micro_batches(epoch_order(engine.seed, e, n)[pos * batch:(pos + 1) * batch])

    return plan


def _tagged(items: list[str]) -> tuple[list[str], int]:
    """A load that shows where it ran (module level: picklable for the workers)."""
    import os

    return items, os.getpid()


def test_loader_yields_the_engines_micro_batches_from_the_start_step_and_leaves_the_global_rng(tmp_path: Path) -> None:
    engine = Engine(tmp_path, OptimConfig(batch_size=4, micro_batch_size=2), seed=3, progress=False, device="cpu")
    items = [f"s{i}" for i in range(10)]
    plan = _plan(engine, len(items))
    want = [[items[i] for i in mb] for s in range(3, 7) for mb in plan(s)]  # 2 epochs of 2 steps: steps 3..6
    assert len(want) == 8 and len({tuple(w) for w in want}) > 1
    for workers in (0, 2):
        torch.manual_seed(11)
        before = torch.get_rng_state()
        got = list(step_loader(items, StepBatchSampler(plan, 3, 7, engine.accum), _tagged, seed=3,
                               num_workers=workers, prefetch_factor=2))
        assert torch.equal(torch.get_rng_state(), before), workers
        assert [g[0] for g in got] == want
        import os

        assert all((g[1] == os.getpid()) == (workers == 0) for g in got)
    # the pitfall the generator avoids: a DataLoader without one draws its worker seed from the global stream
    torch.manual_seed(11)
    before = torch.get_rng_state()
    list(DataLoader(items, batch_size=2, num_workers=0))
    assert not torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_stage1_losses_are_identical_with_0_and_2_workers_and_resume_is_exact(tmp_path: Path) -> None:
    """Straight with 0 workers == stopped mid-epoch and resumed with 2 workers (prefetch 3), bit for bit: the last
    text-encoder block trains, so its dropout draws from the global torch stream at every step (a loader that drew
    its worker seed from that stream fails this at the first step after the loader starts)."""
    job = make_job(tmp_path, n=4, missing=0)
    cfg = tiny_config(stage1=4)
    cfg.stage1.batch_size, cfg.stage1.micro_batch_size = 2, 1  # accumulation 2: two loads per step
    cfg.stage1.text_finetune_layers = 1
    cfg.stage1.checkpoint_every = 1
    cfg.data.num_workers = 0
    run_stage(1, cfg, job, tmp_path / "w0", progress=False)
    cfg.data.num_workers, cfg.data.prefetch_factor = 2, 3
    first = run_stage(1, cfg, job, tmp_path / "resumed", stop_after=3, progress=False)  # mid-epoch (2 per epoch)
    assert not first.finished
    assert run_stage(1, cfg, job, tmp_path / "resumed", resume=True, progress=False).finished
    a, c = (_losses(tmp_path / r / "stage1" / "metrics.csv") for r in ("w0", "resumed"))
    assert len(a) == 4 and len(set(a)) > 1
    assert a == c  # bit for bit
    from safetensors.torch import load_file

    wa, wc = (load_file(str(tmp_path / r / "stage1" / "final" / "alignment.safetensors")) for r in ("w0", "resumed"))
    assert wa.keys() == wc.keys() and all(torch.equal(wa[k], wc[k]) for k in wa)
