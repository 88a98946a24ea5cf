"""`hwsi plan`: the real model's size and memory, checked without a GPU (docs/devices.md, "hwsi plan").

    plan = build_plan(load_train_config("paper"), regions=64, gpus=4)
    print("\n".join(plan.lines()))

Every part is built on PyTorch's meta device (shapes, no storage): the LLM from the run's local ``config.json``
(``model.llm_path``) or, when that folder is not on this machine, Qwen2.5-7B-Instruct's published config
(:data:`QWEN25_7B_INSTRUCT`); the hierarchy, alignment heads and projectors from the config's dims; the stage-3 LoRA
adapters with peft on the meta LLM; the fine-tuned blocks of the stage-1 text tower from the registry's encoder.

Memory per GPU under ZeRO-3 (everything sharded over ``gpus``): frozen weights in the LLM's dtype; every trained
parameter as float32 master weight + float32 gradient + Adam's two float32 moments (16 bytes); activations of one
micro-batch at ``model.max_length`` tokens through the LLM, ``34·s·b·h`` bytes per layer (Korthikanti et al. 2022,
"Reducing Activation Recomputation", bf16, attention scores not stored: SDPA / flash attention), not sharded; with
full activation checkpointing ``2·s·b·h`` per layer plus one layer's ``34·s·b·h``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwsi.errors import ConfigError
from hwsi.features.encoders import create_text_encoder, parse_encoder_spec
from hwsi.model.heads import AlignmentHeads
from hwsi.model.hierarchy import HierarchicalEncoder
from hwsi.model.mllm import MLLMConfig
from hwsi.model.projectors import Projectors
from hwsi.train.config import TrainConfig
from hwsi.train.stage1 import unfreeze_last_layers

#: config.json of Qwen/Qwen2.5-7B-Instruct (the paper's LLM), the fields that set its size
QWEN25_7B_INSTRUCT: dict[str, Any] = {
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
}
GIB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def n_params(module: nn.Module | None, trainable: bool | None = None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


@dataclass
class StagePlan:
    """One training stage: what it trains and what one GPU holds under ZeRO-3."""

    stage: int
    trained: dict[str, int]  # part -> parameters trained
    frozen: int  # parameters held but not trained
    micro_batch: int
    gib: dict[str, float] = field(default_factory=dict)  # weights, grads+optimizer, activations, total, ...

    @property
    def n_trained(self) -> int:
        return sum(self.trained.values())


@dataclass
class Plan:
    llm_source: str
    llm_shape: dict[str, int]
    params: dict[str, int]  # llm, hierarchy, heads, projectors, lora, text_tuned
    regions: int
    visual_tokens: int
    gpus: int
    stages: list[StagePlan]

    def lines(self) -> list[str]:
        p, s = self.params, self.llm_shape
        out = [f"LLM: {self.llm_source} — hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads "
               f"({s['kv_heads']} KV), intermediate {s['intermediate']}, vocab {s['vocab']}",
               "parameters:"]
        out += [f"  {k:<12} {_count(v):>10}" for k, v in p.items()]
        out.append(f"  {'total':<12} {_count(sum(v for k, v in p.items() if k != 'text_tuned')):>10} "
                   "(text tower's tuned blocks not in the total)")
        out.append(f"visual tokens per slide at {self.regions} regions: {self.visual_tokens}")
        out.append(f"per GPU under ZeRO-3 over {self.gpus} GPU(s), GiB:")
        for st in self.stages:
            trained = ", ".join(f"{k} {_count(v)}" for k, v in st.trained.items() if v)
            g = st.gib
            out.append(f"  stage {st.stage}: trains {_count(st.n_trained)} ({trained}); weights {g['weights']:.1f}, "
                       f"grads+Adam {g['optimizer']:.1f}, activations {g['activations']:.1f} (checkpointed "
                       f"{g['activations_checkpointed']:.1f}) at micro-batch {st.micro_batch}; total {g['total']:.1f}"
                       f" ({g['total_checkpointed']:.1f} checkpointed)")
        return out


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def llm_config(cfg: TrainConfig) -> tuple[Any, str]:
    """(transformers config, where it came from): the run's local LLM folder, else Qwen2.5-7B-Instruct's."""
    from transformers import AutoConfig, Qwen2Config

    p = Path(cfg.model.llm_path).expanduser() if cfg.model.llm_path else None
    if p is not None and (p / "config.json").is_file():
        return AutoConfig.from_pretrained(p, local_files_only=True), str(p / "config.json")
    return Qwen2Config(**QWEN25_7B_INSTRUCT), "Qwen2.5-7B-Instruct (published config.json)"


@contextlib.contextmanager
def _meta():
    with torch.device("meta"):
        yield


def meta_llm(config: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with _meta():
        return AutoModelForCausalLM.from_config(config)


def lora_params(llm: nn.Module, cfg: TrainConfig) -> int:
    """Parameters of the stage-3 LoRA adapters (peft on the meta LLM; the LLM itself is left as it was)."""
    from peft import LoraConfig, get_peft_model

    s3 = cfg.stage3
    lc = LoraConfig(r=s3.lora_rank, lora_alpha=s3.lora_alpha, lora_dropout=s3.lora_dropout,
                    target_modules=list(s3.lora_targets))
    with _meta():
        wrapped = get_peft_model(copy.deepcopy(llm), lc)
    return sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)


def text_tuned_params(cfg: TrainConfig) -> int:
    """Parameters of the stage-1 text tower's fine-tuned blocks (``stage1.text_finetune_layers``)."""
    n = cfg.stage1.text_finetune_layers
    if n <= 0:
        return 0
    name, _ = parse_encoder_spec(cfg.data.text_encoder)  # the architecture only: no checkpoint is read
    with _meta():
        enc = create_text_encoder(name)
    return unfreeze_last_layers(enc, n)


def visual_tokens(model: MLLMConfig, n_regions: int) -> int:
    """Tokens of one slide's visual prefix (MLLMHWSI.project): k cells and k patches per region, one token per region,
    one for the slide, and the begin/end markers of each active scale."""
    h, k = model.hierarchy, model.k
    per_scale = {"cells": n_regions * k, "patches": n_regions * k, "regions": n_regions, "slide": 1}
    scales = h.scales()
    return sum(per_scale[s] for s in scales) + (2 * len(scales) if model.projector.markers else 0)


def _activation_bytes(shape: dict[str, int], seq: int, micro_batch: int, dtype_bytes: int) -> tuple[float, float]:
    """(without, with full checkpointing) bytes of the LLM's activations for one micro-batch (module docstring)."""
    sbh = seq * micro_batch * shape["hidden"]
    per_layer = 34 * sbh * dtype_bytes / 2  # the 34·s·b·h figure counts bf16 bytes
    return per_layer * shape["layers"], (2 * sbh * dtype_bytes / 2) * shape["layers"] + per_layer


def build_plan(cfg: TrainConfig, regions: int | None = None, gpus: int = 1) -> Plan:
    """Parameters, visual tokens and ZeRO-3 memory of ``cfg``'s model (module docstring)."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    n_regions = cfg.model.max_regions if regions is None else regions
    if n_regions < 1:
        raise ConfigError(f"--regions must be >= 1, got {n_regions}")
    hcfg = cfg.model.hierarchy
    if hcfg.patch_dim <= 0 or hcfg.ccaf.in_dim <= 0 or hcfg.vit4k.in_dim <= 0 or hcfg.slide.in_dim <= 0 \
            or cfg.model.text_dim <= 0:
        raise ConfigError("hwsi plan needs the feature dims in the config (model.hierarchy.patch_dim, ccaf.in_dim, "
                          "vit4k.in_dim, slide.in_dim, model.text_dim), as configs/paper.yaml sets them")
    config, source = llm_config(cfg)
    llm = meta_llm(config)
    shape = {"hidden": config.hidden_size, "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
             "kv_heads": config.num_key_value_heads, "intermediate": config.intermediate_size,
             "vocab": config.vocab_size}
    if cfg.model.projector.llm_dim != shape["hidden"]:
        raise ConfigError(f"model.projector.llm_dim {cfg.model.projector.llm_dim} != the LLM's hidden size "
                          f"{shape['hidden']} ({source})")
    with _meta():
        hierarchy = HierarchicalEncoder(hcfg)
        heads = AlignmentHeads(hcfg.dims(), cfg.model.text_dim)
        projectors = Projectors(hcfg.dims(), cfg.model.projector)
    params = {"llm": n_params(llm), "hierarchy": n_params(hierarchy), "heads": n_params(heads),
              "projectors": n_params(projectors), "lora": lora_params(llm, cfg), "text_tuned": text_tuned_params(cfg)}
    w = _DTYPE_BYTES[cfg.llm_dtype]
    seq = cfg.model.max_length
    stages = []
    for n, trained, frozen in (
        (1, {"hierarchy": params["hierarchy"], "heads": params["heads"], "text_tuned": params["text_tuned"]}, 0),
        (2, {"projectors": params["projectors"]}, params["llm"] + params["hierarchy"]),
        (3, {"projectors": params["projectors"], "lora": params["lora"]}, params["llm"] + params["hierarchy"]),
    ):
        mb = cfg.stage(n).micro_batch_size
        weights = frozen * (w if n > 1 else 4) / gpus
        optimizer = sum(trained.values()) * 16 / gpus
        act, act_ckpt = _activation_bytes(shape, seq, mb, w) if n > 1 else (0.0, 0.0)
        gib = {"weights": weights / GIB, "optimizer": optimizer / GIB, "activations": act / GIB,
               "activations_checkpointed": act_ckpt / GIB}
        gib["total"] = gib["weights"] + gib["optimizer"] + gib["activations"]
        gib["total_checkpointed"] = gib["weights"] + gib["optimizer"] + gib["activations_checkpointed"]
        stages.append(StagePlan(n, trained, frozen, mb, gib))
    return Plan(source, shape, params, n_regions, visual_tokens(cfg.model, n_regions), gpus, stages)
