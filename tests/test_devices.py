"""hwsi.devices: one resolver of --device / --dtype for every command that runs a network (docs/devices.md).

The machine-dependent checks use what this machine has: with no CUDA, ``--device cuda`` must be a one-line error;
with CUDA, it must resolve to ``cuda:N``. bf16 runs on the CPU (AVX-512 BF16 here) and is compared with float32 in
tests/test_devices_bf16.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hwsi.cli import main
from hwsi.devices import Placement, accelerator_kwargs, check_device_spec, resolve_placement, torch_dtype
from hwsi.errors import ConfigError

HAS_CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA: the no-CUDA messages cannot be produced")


def test_defaults_are_float32_on_the_cpu() -> None:
    p = resolve_placement()
    assert p == Placement("cpu", "float32", "cpu")
    assert p.torch_device == torch.device("cpu") and p.torch_dtype is torch.float32
    assert p.record() == {"device": "cpu", "dtype": "float32", "requested": "cpu"}
    assert resolve_placement("cpu", "bfloat16").torch_dtype is torch.bfloat16
    assert torch_dtype("float16") is torch.float16


def test_auto_takes_cuda_when_there_is_one_else_the_cpu() -> None:
    p = resolve_placement("auto", "float32")
    assert p.device == ("cuda:" if HAS_CUDA else "cpu") + (str(torch.cuda.current_device()) if HAS_CUDA else "")
    assert p.record()["requested"] == "auto"


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "tpu", "cpu:0", ""])
def test_bad_device_names_say_what_is_accepted(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"^--device must be cpu, cuda, cuda:N or auto"):
        check_device_spec(spec)


def test_bad_dtype_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"^--dtype must be float32, bfloat16, float16, got 'fp8'$"):
        resolve_placement("cpu", "fp8")


def test_float16_on_the_cpu_says_what_is_supported() -> None:
    with pytest.raises(ConfigError) as e:
        resolve_placement("cpu", "float16")
    msg = str(e.value)
    assert "\n" not in msg and "not supported on the CPU" in msg and "bfloat16 or float32" in msg


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_one_line(spec: str) -> None:
    with pytest.raises(ConfigError, match=rf"^--device {spec}: no CUDA device on this machine \(torch .*\); use "
                                          r"--device cpu or auto$"):
        resolve_placement(spec)


@no_cuda
def test_auto_with_float16_on_a_cpu_machine_is_an_error() -> None:
    with pytest.raises(ConfigError, match="float16 is not supported on the CPU"):
        resolve_placement("auto", "float16")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_resolves_to_an_index_and_a_missing_index_is_named() -> None:
    assert resolve_placement("cuda:0").device == "cuda:0"
    n = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"has {n} CUDA device"):
        resolve_placement(f"cuda:{n}")


def test_accelerator_kwargs_keep_accelerates_default_and_refuse_fp16_on_cpu(monkeypatch) -> None:
    assert accelerator_kwargs("auto") == {}
    assert accelerator_kwargs("cpu") == ({"cpu": True} if HAS_CUDA else {})
    if not HAS_CUDA:
        with pytest.raises(ConfigError, match="fp16 mixed precision needs CUDA"):
            accelerator_kwargs("auto", "fp16")
    else:
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(ConfigError, match="names one GPU but 2 processes run"):
            accelerator_kwargs("cuda:0")


# ---- the CLI: every command that runs a network takes the options and fails in one line -----------------------
@pytest.mark.parametrize("command", [
    ["extract", "JOB"], ["train", "--stage", "1", "--config", "tiny"], ["eval", "--data", "D", "--model", "M"],
    ["ask", "S.h5", "--run", "R"], ["serve", "JOB"],
])
def test_every_network_command_checks_device_and_dtype_options(command: list[str], capsys) -> None:
    assert main([*command, "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--device" in err and "must be cpu, cuda, cuda:N or auto, got 'gpu'" in err, err
    assert main([*command, "--dtype", "half"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "must be float32, bfloat16, float16, got 'half'" in err, err


@no_cuda
def test_extract_on_cuda_without_one_is_one_line_before_any_work(tmp_path: Path, capsys) -> None:
    from test_extract import PATCH, REGION, tile_fn  # the synthetic slide of tests/test_extract.py

    from hwsi.slide import GridConfig, TileConfig, tile_batch
    from hwsi.synth.pyramid import write_pyramid_tiff

    write_pyramid_tiff(tmp_path / "s1.tiff", 1024, 512, 0.5, tile_fn, min_level_side=256)
    assert tile_batch(tmp_path / "s1.tiff", tmp_path / "job", TileConfig(grid=GridConfig(region_size=REGION,
                      patch_size=PATCH)), show_progress=False).exit_code == 0
    capsys.readouterr()  # the tile summary
    assert main(["extract", str(tmp_path / "job"), "--device", "cuda", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA device on this machine" in err, err
    assert main(["extract", str(tmp_path / "job"), "--dtype", "float16", "-q"]) == 2
    assert "float16 is not supported on the CPU" in capsys.readouterr().err
    assert not (tmp_path / "job" / "errors").exists() or not list((tmp_path / "job" / "errors").iterdir())


@no_cuda
def test_train_on_cuda_without_one_is_one_line(tmp_path: Path, capsys) -> None:
    from test_train import make_job

    job = make_job(tmp_path)
    assert main(["train", "--stage", "1", "--config", "tiny", "--job", str(job), "--out", str(tmp_path / "run"),
                 "--device", "cuda:1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--device" not in err and "device cuda:1: no CUDA device" in err, err
    assert not (tmp_path / "run" / "stage1").exists()


def test_a_config_with_a_bad_device_names_the_file_and_key(tmp_path: Path) -> None:
    from hwsi.train.config import load_train_config

    p = tmp_path / "bad.yaml"
    p.write_text("device: gpu0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: device must be cpu, cuda, cuda:N or auto, got 'gpu0'$"):
        load_train_config(p)


def test_training_records_device_and_dtype(tmp_path: Path) -> None:
    """RUN/stageN/result.json says where the stage ran and in which dtype (stage 1: float32 weights)."""
    from test_train import make_job, tiny_config

    from hwsi.train.stages import run_stage

    job = make_job(tmp_path, n=4)
    cfg = tiny_config(stage1=1)
    cfg.device = "cpu"
    res = run_stage(1, cfg, job, tmp_path / "run", progress=False)
    assert res.finished
    saved = json.loads((tmp_path / "run" / "stage1" / "result.json").read_text())
    assert saved["placement"] == {"backend": "accelerate", "device": "cpu", "dtype": "float32", "mixed_precision": "no", "requested": "cpu"}
    assert "device: cpu" in (tmp_path / "run" / "config.yaml").read_text()


def test_train_refuses_float16_on_the_cpu_in_one_line(tmp_path: Path, capsys) -> None:
    assert main(["train", "--stage", "1", "--config", "tiny", "--job", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--dtype", "float16", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "float16 is not supported on the CPU" in err, err


def test_stages_2_and_3_train_a_bf16_llm_on_the_cpu(tmp_path: Path) -> None:
    """configs/paper.yaml's pairing (llm_dtype bfloat16, precision bf16) on the CPU: the LM stages run, their
    losses are finite, and result.json records it."""
    import numpy as np
    from accelerate.state import AcceleratorState
    from test_train import make_job, tiny_config

    from hwsi.train.stages import run_stage

    job = make_job(tmp_path, n=4)
    cfg = tiny_config(stage0=2, stage1=1, stage2=2, stage3=2)
    cfg.device, cfg.llm_dtype, cfg.precision = "cpu", "bfloat16", "bf16"
    run = tmp_path / "run"
    # accelerate keeps ONE mixed precision per process (a `hwsi train` process runs one stage); the other tests of
    # this session ran with precision "no", so the state is reset around this one
    AcceleratorState._reset_state(True)
    try:
        for s in range(4):
            res = run_stage(s, cfg, job, run, progress=False)
            assert res.finished and np.isfinite(res.losses).all(), (s, res.losses)
    finally:
        AcceleratorState._reset_state(True)
    saved = json.loads((run / "stage3" / "result.json").read_text())
    assert saved["placement"] == {"backend": "accelerate", "device": "cpu", "dtype": "bfloat16", "mixed_precision": "bf16", "requested": "cpu"}
