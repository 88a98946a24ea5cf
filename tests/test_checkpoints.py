"""Foreign checkpoints as their tools write them: HIPT's full DINO training checkpoint, Git LFS pointers, truncated
files (docs/formats-checkpoints-records.md).

No real HIPT/CONCH weights are available here, so the DINO checkpoint is a stand-in at reduced size saved the way
facebookresearch/dino ``main_dino.py`` (and HIPT's copy, ``1-Hierarchical-Pretraining/main_dino4k.py``) save theirs::

    save_dict = {'student': student.state_dict(), 'teacher': teacher.state_dict(),
                 'optimizer': optimizer.state_dict(), 'epoch': epoch + 1, 'args': args,
                 'dino_loss': dino_loss.state_dict()}           # + 'fp16_scaler' with --use_fp16
    torch.save(save_dict, 'checkpoint.pth')

with the student wrapped in DistributedDataParallel (keys ``module.backbone.*``, ``module.head.*``), the teacher a
bare ``MultiCropWrapper`` (``backbone.*``, ``head.*``) around the registered HIPT ViT at its tiny size, the head
DINO's ``DINOHead`` layout (3-layer MLP + weight-normed ``last_layer``), AdamW over DINO's two parameter groups after
one real step, and ``args`` an ``argparse.Namespace`` with DINO's option types. The LFS pointer is the text
``git lfs`` leaves in a clone made without it (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md).
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from hwsi.errors import ConfigError, HwsiError
from hwsi.features.encoders import EncoderError, create_encoder, encoder_entry, read_state_dict
from hwsi.features.encoders.checkpoints import (
    ALLOWED_GLOBALS,
    check_folder_not_lfs_pointers,
    lfs_pointer_reason,
)
from hwsi.features.encoders.hipt import HiptViT256, HiptViT256Config
from hwsi.model.llm import load_llm
from hwsi.model.vit4k import ViT4K, ViT4KConfig, load_hipt_vit4k

TINY = encoder_entry("hipt_vit256").tiny
# DINO's head uses the old nn.utils.weight_norm (keys last_layer.weight_g / weight_v), deprecated in torch 2.x
pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")


class DINOHead(nn.Module):
    """The key layout of DINO's ``DINOHead`` (nlayers=3, weight-normed last layer), at a small width."""

    def __init__(self, in_dim: int, out_dim: int = 64, hidden_dim: int = 32, bottleneck_dim: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(nn.functional.normalize(self.mlp(x), dim=-1))


class MultiCropWrapper(nn.Module):
    """DINO's ``utils.MultiCropWrapper``: attributes ``backbone`` and ``head``."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class DDPKeys(nn.Module):
    """What ``DistributedDataParallel(student)`` adds to the state-dict keys: the ``module.`` attribute."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def dino_args() -> argparse.Namespace:
    """``args`` as DINO's parser leaves them (option types of main_dino.py), after ``init_distributed_mode``."""
    p = argparse.ArgumentParser("DINO", add_help=False)
    p.add_argument("--arch", default="vit_small", type=str)
    p.add_argument("--patch_size", default=16, type=int)
    p.add_argument("--out_dim", default=65536, type=int)
    p.add_argument("--norm_last_layer", default=False, type=bool)
    p.add_argument("--momentum_teacher", default=0.996, type=float)
    p.add_argument("--use_fp16", default=True, type=bool)
    p.add_argument("--global_crops_scale", type=float, nargs="+", default=(0.4, 1.0))
    p.add_argument("--local_crops_number", type=int, default=8)
    p.add_argument("--local_crops_scale", type=float, nargs="+", default=(0.05, 0.4))
    p.add_argument("--data_path", default="/path/to/patches/", type=str)
    p.add_argument("--output_dir", default=".", type=str)
    p.add_argument("--dist_url", default="env://", type=str)
    p.add_argument("--local_rank", default=0, type=int)
    args = p.parse_args([])
    args.rank, args.world_size, args.gpu, args.dist_backend = 0, 1, 0, "nccl"
    return args


def save_dino_checkpoint(path: Path, args: argparse.Namespace | None = None) -> MultiCropWrapper:
    """A full DINO checkpoint of a tiny HIPT ViT-256; returns the teacher (student and teacher differ)."""
    cfg = HiptViT256Config(**TINY)
    student = MultiCropWrapper(HiptViT256(cfg).vit, DINOHead(cfg.width))
    teacher = MultiCropWrapper(HiptViT256(HiptViT256Config(**TINY, seed=1)).vit, DINOHead(cfg.width))
    ddp_student = DDPKeys(student)
    regularized = [p for n, p in student.named_parameters() if not (n.endswith(".bias") or p.ndim == 1)]
    not_regularized = [p for n, p in student.named_parameters() if n.endswith(".bias") or p.ndim == 1]
    optimizer = torch.optim.AdamW([{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}])
    student(torch.rand(2, 3, cfg.input_size, cfg.input_size)).sum().backward()
    optimizer.step()
    save_dict = {
        "student": ddp_student.state_dict(),
        "teacher": teacher.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 101,
        "args": args if args is not None else dino_args(),
        "dino_loss": {"center": torch.zeros(1, 64)},  # DINOLoss.state_dict(): its registered buffer
        "fp16_scaler": torch.amp.GradScaler("cpu").state_dict(),
    }
    torch.save(save_dict, path)
    return teacher


def lfs_pointer(path: Path, real_size: int = 721_331_111) -> str:
    """Write the pointer file git-lfs leaves in a clone without LFS; returns its oid."""
    oid = hashlib.sha256(b"the real weights").hexdigest()
    path.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {real_size}\n")
    return oid


# ------------------------------------------------------------------------------------- full DINO checkpoint
def test_full_dino_checkpoint_loads_the_teacher(tmp_path: Path) -> None:
    p = tmp_path / "vit256_small_dino.pth"
    teacher = save_dino_checkpoint(p)
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):  # the stand-in has the upstream problem
        torch.load(p, weights_only=True)
    model = create_encoder("hipt_vit256", checkpoint=p, **TINY).eval()
    ours = model.vit.state_dict()
    theirs = teacher.backbone.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.rand(2, 3, TINY["input_size"], TINY["input_size"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), teacher.backbone.eval()(x))


def test_student_differs_so_the_choice_is_tested(tmp_path: Path) -> None:
    p = tmp_path / "ck.pth"
    teacher = save_dino_checkpoint(p)
    state = read_state_dict(p, unwrap=("student",))
    w = "module.backbone.blocks.0.attn.qkv.weight"
    assert w in state and not torch.equal(state[w], teacher.backbone.state_dict()["blocks.0.attn.qkv.weight"])
    # the whole dict is read with exactly the globals allowed (nothing else added to torch's allow-list)
    assert ALLOWED_GLOBALS == (argparse.Namespace,)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


def test_dino_checkpoint_with_another_global_is_refused_naming_it(tmp_path: Path) -> None:
    args = dino_args()
    args.output_dir = Path("/out")  # a pathlib object in args: not allowed, never unpickled
    p = tmp_path / "ck.pth"
    save_dino_checkpoint(p, args)
    with pytest.raises(EncoderError) as err:
        create_encoder("hipt_vit256", checkpoint=p, **TINY)
    msg = str(err.value)
    assert msg.startswith(f"{p}: cannot read checkpoint: its pickle needs pathlib.")
    assert "argparse.Namespace" in msg and "\n" not in msg and "\x1b" not in msg


def test_vit4k_reads_a_full_dino_checkpoint(tmp_path: Path) -> None:
    cfg = ViT4KConfig(in_dim=12, dim=24, depth=2, n_heads=3, pos_grid=4)
    src = ViT4K(cfg)
    ck = {"teacher": {f"backbone.{k}": v for k, v in src.state_dict().items()}, "student": {}, "args": dino_args(),
          "epoch": 1}
    torch.save(ck, tmp_path / "vit4k_xs_dino.pth")
    model = load_hipt_vit4k(ViT4K(ViT4KConfig(in_dim=12, dim=24, depth=2, n_heads=3, pos_grid=4)),
                            tmp_path / "vit4k_xs_dino.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())


# ------------------------------------------------------------------------------------- LFS pointers
def test_lfs_pointer_is_one_line_naming_it(tmp_path: Path) -> None:
    p = tmp_path / "vit256_small_dino.pth"
    oid = lfs_pointer(p)
    size = p.stat().st_size
    with pytest.raises(EncoderError) as err:
        create_encoder("hipt_vit256", checkpoint=p, **TINY)
    assert str(err.value) == (
        f"{p}: this is a Git LFS pointer ({size} bytes, oid sha256:{oid[:16]}...; the real file is 721,331,111 "
        "bytes), not the weights: run `git lfs pull` in the clone it comes from (or download the file itself)")
    # the same for every checkpoint reader: CONCH's image tower, safetensors, ViT-4K
    for name in ("pytorch_model.bin", "model.safetensors"):
        q = tmp_path / name
        lfs_pointer(q)
        with pytest.raises(EncoderError, match=rf"{name}: this is a Git LFS pointer"):
            read_state_dict(q)
    with pytest.raises(EncoderError, match="Git LFS pointer"):
        create_encoder("conch_vit_b16", checkpoint=tmp_path / "pytorch_model.bin", **encoder_entry("conch_vit_b16").tiny)
    lfs_pointer(tmp_path / "vit4k_xs_dino.pth")
    with pytest.raises(HwsiError, match="vit4k_xs_dino.pth: this is a Git LFS pointer"):
        load_hipt_vit4k(ViT4K(ViT4KConfig(in_dim=12, dim=24, depth=2, n_heads=3, pos_grid=4)),
                        tmp_path / "vit4k_xs_dino.pth")


def test_lfs_pointer_in_a_model_folder(tmp_path: Path) -> None:
    llm = tmp_path / "Qwen2.5-7B-Instruct"
    llm.mkdir()
    (llm / "config.json").write_text('{"model_type": "qwen2"}')
    (llm / "tokenizer_config.json").write_text("{}")
    lfs_pointer(llm / "model-00001-of-00004.safetensors", 3_945_441_440)
    with pytest.raises(ConfigError, match=r"model-00001-of-00004.safetensors: this is a Git LFS pointer \(\d+ bytes, "
                                          r"oid sha256:[0-9a-f]{16}\.\.\.; the real file is 3,945,441,440 bytes\)"):
        load_llm(llm)
    st = tmp_path / "all-MiniLM-L6-v2"
    (st / "1_Pooling").mkdir(parents=True)
    (st / "modules.json").write_text("[]")
    lfs_pointer(st / "1_Pooling" / "config.json", 190)
    with pytest.raises(EncoderError, match=r"1_Pooling/config.json: this is a Git LFS pointer"):
        check_folder_not_lfs_pointers(st)


def test_not_a_pointer() -> None:
    assert lfs_pointer_reason(Path(__file__)) is None
    assert lfs_pointer_reason(Path("/nonexistent/file.pth")) is None


# ------------------------------------------------------------------------------------- truncated / not a checkpoint
def test_truncated_and_empty_and_foreign_files(tmp_path: Path) -> None:
    full = tmp_path / "full.pth"
    save_dino_checkpoint(full)
    raw = full.read_bytes()
    cut = tmp_path / "vit256_small_dino.pth"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(EncoderError) as err:
        create_encoder("hipt_vit256", checkpoint=cut, **TINY)
    msg = str(err.value)
    assert msg.startswith(f"{cut}: cannot read checkpoint: the file is incomplete ({len(raw) // 2:,} bytes; an "
                          "interrupted download or copy?)")
    assert "\n" not in msg and "\x1b" not in msg and "miniz" not in msg
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(EncoderError, match=r"empty.pth: cannot read checkpoint: the file is empty \(0 bytes\)"):
        read_state_dict(empty)
    text = tmp_path / "notes.pth"
    text.write_text("download from https://... later")
    with pytest.raises(EncoderError, match="notes.pth: cannot read checkpoint: not a PyTorch checkpoint"):
        read_state_dict(text)
    from safetensors.torch import save_file

    st = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(64)}, str(st))
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(EncoderError, match="model.safetensors: cannot read checkpoint: the file is incomplete"):
        read_state_dict(st)


# ------------------------------------------------------------------------------------- the command a user runs
def test_extract_cli_names_the_pointer_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hwsi.cli import main

    (tmp_path / "job" / "stores").mkdir(parents=True)
    (tmp_path / "job" / "stores" / "a.h5").write_bytes(b"")  # the encoders are built before any store is opened
    ptr = tmp_path / "vit256_small_dino.pth"
    lfs_pointer(ptr)
    assert main(["extract", str(tmp_path / "job"), "--patch-encoder", f"hipt_vit256:{ptr}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {ptr}: this is a Git LFS pointer (")
    assert "Traceback" not in "\n".join(err)
