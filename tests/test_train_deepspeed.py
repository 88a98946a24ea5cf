"""Stage 3 (LoRA + projectors) under DeepSpeed ZeRO-3 on 2 CPU processes (docs/cluster.md "DeepSpeed ZeRO-3").

``backend: deepspeed``: the Engine drives ``deepspeed.initialize`` itself (on the CPU accelerate ignores DeepSpeed);
launched with torchrun (gloo) through tests/test_train_multiprocess.py's worker, on the tiny config of the other
training tests. Checked: the run is 2 real processes with different shards and ZeRO stage 3 (``processes.json``);
every checkpoint holds one optimizer shard per process; a run stopped after 2 steps and resumed logs the losses of
an uninterrupted one; the losses are those of the 1-process accelerate run (same global batch); the final LoRA and
projectors, gathered from the shards, are what ``hwsi ask`` and ``hwsi eval`` load.

Skipped when deepspeed (the ``deepspeed`` extra, installed by ``make test``) is not importable.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not "
                                     "installed (the deepspeed extra: make test installs '.[test,deepspeed]')")

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS = 4
# ZeRO-3 (2 processes, partitioned fp32 AdamW) vs accelerate (1 process): the same sums in another order (float32)
ZERO3_RTOL, ZERO3_ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Stages 0-2 and a 1-process accelerate stage 3 in this process; stage 3 under ZeRO-3 on 2 processes, once
    straight through and once stopped after 2 steps and resumed (a second torchrun session)."""
    from hwsi.config import save_config
    from hwsi.train.config import load_train_config
    from hwsi.train.stages import run_stage
    from test_train import make_job, tiny_config
    from test_train_multiprocess import _torchrun

    root = tmp_path_factory.mktemp("zero3")
    job = make_job(root)
    cfg = tiny_config(stage1=2, stage2=2, stage3=STEPS)
    cfg.stage0.max_steps = 2
    cfg.stage3.batch_size, cfg.stage3.micro_batch_size, cfg.stage3.checkpoint_every = 4, 1, 1
    cfg.stage3.keep_checkpoints = 1
    one = root / "one.yaml"
    save_config(cfg, one)
    cfg.backend = "deepspeed"
    cfg.device = "cpu"
    zero = root / "zero3.yaml"
    save_config(cfg, zero)
    ref = root / "ref"
    for s in range(4):
        assert run_stage(s, load_train_config(one), job, ref, progress=False).finished
    d = root / "two"
    for name in ("z3", "z3r", "z3one"):
        (d / name).mkdir(parents=True)
        shutil.copy(ref / "config.yaml", d / name / "config.yaml")
        for part in ("stage0", "stage1", "stage2"):
            shutil.copytree(ref / part, d / name / part)
    base = {"kind": "stage", "job": str(job), "stage": 3, "config": str(zero)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_ACCELERATOR", "cpu")
        _torchrun([{**base, "out": str(d / "z3")}, {**base, "out": str(d / "z3r"), "stop_after": 2}], root)
        stopped = sorted(p.name for p in (d / "z3r" / "stage3" / "checkpoints").iterdir())
        _torchrun([{**base, "out": str(d / "z3r"), "resume": True}], root)
        # one process, no launcher, through the command line (hwsi makes the process group of one)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
        env.pop("WORLD_SIZE", None)
        subprocess.run(["nice", "-n", "10", sys.executable, "-m", "hwsi.cli", "train", "--stage", "3", "--config",
                        str(zero), "--job", str(job), "--out", str(d / "z3one")], check=True, env=env, timeout=600,
                       capture_output=True)
    return {"ref": ref, "two": d, "job": job, "stopped": stopped}


def _losses(stage_dir: Path) -> list[float]:
    from hwsi.train.engine import MetricsLog

    return [float(r["loss"]) for r in MetricsLog(stage_dir / "metrics.csv").rows()]


@pytest.mark.slow
@needs_deepspeed
def test_zero3_runs_on_two_processes_each_with_its_own_shard(runs: dict) -> None:
    for name in ("z3", "z3r"):
        rec = json.loads((runs["two"] / name / "stage3" / "processes.json").read_text())
        assert rec["num_processes"] == rec["world_size_env"] == WORLD
        assert rec["backend"] == "deepspeed" and rec["zero_stage"] == 3
        procs = rec["processes"]
        assert [p["rank"] for p in procs] == list(range(WORLD)) and len({p["pid"] for p in procs}) == WORLD
        assert procs[0]["first_steps"] and len(procs[0]["first_steps"]) == len(procs[1]["first_steps"])
        for a, b in zip(procs[0]["first_steps"], procs[1]["first_steps"], strict=True):
            assert a and b and not set(a) & set(b), (a, b)
    assert json.loads((runs["two"] / "z3r" / "stage3" / "processes.json").read_text())["start_step"] == 2


@pytest.mark.slow
@needs_deepspeed
def test_zero3_checkpoint_is_sharded_per_process(runs: dict) -> None:
    assert runs["stopped"] == ["last", "step_0000002"]
    ckpt = runs["two"] / "z3" / "stage3" / "checkpoints" / f"step_{STEPS:07d}"
    state = ckpt / "deepspeed" / "state"
    assert sorted(p.name for p in state.iterdir()) == sorted(  # one model and one optimizer shard per process
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(WORLD) for kind in ("model", "optim"))
    assert sorted(p.name for p in ckpt.glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    assert json.loads((ckpt / "state.json").read_text())["step"] == STEPS
    assert not (ckpt / "trainable.pt").exists()  # the model/optimizer state is DeepSpeed's, not the accelerate one


@pytest.mark.slow
@needs_deepspeed
def test_zero3_stopped_and_resumed_equals_the_uninterrupted_run(runs: dict) -> None:
    straight, resumed = _losses(runs["two"] / "z3" / "stage3"), _losses(runs["two"] / "z3r" / "stage3")
    assert len(straight) == STEPS and len(set(straight)) > 1
    assert resumed == straight, (straight, resumed)  # bit for bit
    assert json.loads((runs["two"] / "z3r" / "stage3" / "result.json").read_text())["metrics"]["steps"] == STEPS


@pytest.mark.slow
@needs_deepspeed
def test_zero3_losses_equal_the_one_process_accelerate_run(runs: dict) -> None:
    """2 processes (torchrun) and 1 process (`hwsi train`, no launcher) under ZeRO-3 vs accelerate on 1 process."""
    ref = _losses(runs["ref"] / "stage3")
    assert len(ref) == STEPS
    for name in ("z3", "z3one"):
        z3 = _losses(runs["two"] / name / "stage3")
        worst = max(abs(a - b) for a, b in zip(ref, z3, strict=True))
        print(f"ZeRO-3 {name} vs accelerate 1 process, stage 3 losses: max |diff| {worst:.2e}")
        for a, b in zip(ref, z3, strict=True):
            assert abs(a - b) <= ZERO3_ATOL + ZERO3_RTOL * abs(a), (name, ref, z3)
    one = json.loads((runs["two"] / "z3one" / "stage3" / "processes.json").read_text())
    assert one["num_processes"] == one["world_size_env"] == 1 and one["backend"] == "deepspeed"


@pytest.mark.slow
@needs_deepspeed
def test_final_weights_are_gathered_from_the_shards(runs: dict) -> None:
    """The saved LoRA and projectors are whole (not ZeRO-3's empty placeholders) and equal the accelerate run's."""
    import torch
    from safetensors.torch import load_file

    a, b = runs["ref"] / "stage3" / "final", runs["two"] / "z3" / "stage3" / "final"
    for name in ("projectors.safetensors", "lora/adapter_model.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert sorted(wa) == sorted(wb) and wa
        for k in wa:  # measured max |diff| 1.7e-7 (LoRA), 3e-8 (projectors)
            assert wa[k].shape == wb[k].shape and wb[k].numel() > 0, k
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    lora_b = [v for k, v in load_file(str(b / "lora/adapter_model.safetensors")).items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 1e-4 for v in lora_b)  # trained: LoRA B starts at 0
    before = load_file(str(runs["ref"] / "stage2" / "final" / "projectors.safetensors"))
    after = load_file(str(b / "projectors.safetensors"))
    assert max(float((after[k] - before[k]).abs().max()) for k in after) > 1e-4  # the projectors trained too
    assert json.loads((runs["two"] / "z3" / "stage3" / "result.json").read_text())["metrics"]["lora_params"] > 0


@pytest.mark.slow
@needs_deepspeed
def test_hwsi_ask_and_eval_load_the_zero3_run(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hwsi.cli import main

    run, job = runs["two"] / "z3r", runs["job"]
    store = sorted((job / "stores").glob("*.h5"))[0]
    assert main(["ask", str(store), "--run", str(run), "-q", "What is the grade?", "--max-new-tokens", "3",
                 "--top", "0"]) == 0
    assert f"{store.stem}: 3 regions, 24 visual tokens (cached prefix), on cpu float32" in capsys.readouterr().err
    recs = [{"question_id": f"Open_{store.stem}_1", "image": store.stem, "question": "What is the grade?",
             "T-answer": "low grade.", "metadata": "Open"}]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["eval", "--task", "vqa", "--data", str(data), "--job", str(job), "--model", str(run), "--out",
                 str(tmp_path / "E"), "--max-new-tokens", "4", "--no-meteor"]) == 0
    res = json.loads((tmp_path / "E" / "vqa.json").read_text())
    assert len(res["predictions"]) == 1 and isinstance(res["predictions"][0]["prediction"], str)


def test_backend_deepspeed_is_refused_for_stages_0_and_1(tmp_path: Path) -> None:
    from hwsi.errors import ConfigError
    from hwsi.train.stages import run_stage
    from test_train import make_job, tiny_config

    cfg = tiny_config(stage1=1)
    cfg.backend = "deepspeed"
    with pytest.raises(ConfigError, match="backend: deepspeed drives stages 2 and 3"):
        run_stage(1, cfg, make_job(tmp_path), tmp_path / "run", progress=False)


def test_the_shipped_zero3_config_is_completed_from_the_stage(tmp_path: Path) -> None:
    """What accelerate fills in for `accelerate launch --use_deepspeed`, filled in by hwsi for backend deepspeed."""
    from hwsi.errors import ConfigError
    from hwsi.train.config import OptimConfig
    from hwsi.train.zero3 import deepspeed_settings

    stage = OptimConfig(batch_size=8, micro_batch_size=2, max_grad_norm=0.5)
    ds = deepspeed_settings("deepspeed_zero3.json", stage, 2, 2, "no")
    assert ds["zero_optimization"]["stage"] == 3 and "auto" not in json.dumps(ds)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": False} and "_comment" not in ds
    assert deepspeed_settings("deepspeed_zero3.json", stage, 2, 2, "bf16")["bf16"] == {"enabled": True}
    bad = tmp_path / "ds.json"
    bad.write_text('{"bf16": {"enabled": true}}')
    with pytest.raises(ConfigError, match=r"ds.json: a DeepSpeed config needs a zero_optimization section"):
        deepspeed_settings(str(bad), stage, 2, 2, "no")
    with pytest.raises(ConfigError, match=r"nope.json: not a readable DeepSpeed JSON config \(deepspeed_config\)"):
        deepspeed_settings(str(tmp_path / "nope.json"), stage, 2, 2, "no")


def test_a_checkpoint_is_resumed_only_by_the_backend_that_wrote_it(tmp_path: Path) -> None:
    """A DeepSpeed checkpoint (deepspeed/state, no trainable.pt) under backend accelerate, and the other way round."""
    from hwsi.errors import ConfigError
    from hwsi.train.config import OptimConfig
    from hwsi.train.engine import Engine, TrainError
    from hwsi.train.zero3 import load

    ckpt = tmp_path / "step_0000002"
    (ckpt / "deepspeed" / "state").mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 2, "seed": 0, "processes": 1}))
    engine = Engine(tmp_path / "stage3", OptimConfig(), seed=0, progress=False, device="cpu")
    with pytest.raises(TrainError, match=r"step_0000002: no trainable.pt \(a checkpoint of backend deepspeed\?\)"):
        engine._load(ckpt, None, None, None)
    shutil.rmtree(ckpt / "deepspeed")
    with pytest.raises(ConfigError, match=r"step_0000002: no DeepSpeed checkpoint \(deepspeed/state\)"):
        load(None, ckpt)
