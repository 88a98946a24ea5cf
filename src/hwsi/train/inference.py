"""Loading a trained run for inference (eval, serve, ``hwsi ask``).

    model = load_trained_model(run_dir)                  # MLLMHWSI, eval mode, no grad, LoRA merged
    inputs = slide_inputs_for(store_path, run_dir)       # SlideInputs with the run's selection settings
    chat = ChatSession(model, inputs)                    # hwsi.model.chat
    answers = chat.ask_each(questions)                   # independent answers, batched (docs/generation.md)

Weights: the LLM of the run (``model.llm_path`` or ``RUN/stage0/llm``), stage-1 hierarchy + heads, projectors from
stage 3 when it finished (else stage 2), the stage-3 LoRA adapter merged into the base weights
(``merge=False`` keeps the peft wrapper, e.g. to continue training or to swap adapters).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from hwsi.devices import Placement
from hwsi.model.inputs import SlideInputs, load_slide_inputs
from hwsi.train.bundle import check_stores
from hwsi.train.config import TrainConfig, load_train_config
from hwsi.train.engine import TrainError
from hwsi.train.stage_common import PROJECTORS_FILE, load_safetensors
from hwsi.train.stage_lm import build_model


def run_config(run_dir: str | Path) -> TrainConfig:
    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        raise TrainError(f"{run_dir}: not a training run folder (no config.yaml; run `hwsi train` first)")
    return load_train_config(p)


def load_trained_model(run_dir: str | Path, merge: bool = True, device: str | torch.device = "cpu",
                       placement: Placement | None = None):
    """The trained MLLMHWSI of ``run_dir`` (see the module docstring), in eval mode with grads off.

    ``placement`` (:func:`hwsi.devices.resolve_placement` of ``--device`` / ``--dtype``): the LLM is loaded in its
    dtype straight onto its device, the hierarchy and projectors follow in float32; None = the run's
    ``llm_dtype`` on ``device``. ``model.placement`` records what was used (docs/devices.md)."""
    run = Path(run_dir)
    cfg = run_config(run)
    if placement is not None:
        cfg = copy.deepcopy(cfg)
        cfg.llm_dtype, device = placement.dtype, placement.device
    else:
        placement = Placement(str(torch.device(device)), cfg.llm_dtype, str(device))
    s3 = run / "stage3" / "final"
    s2 = run / "stage2" / "final" / PROJECTORS_FILE
    if not (s3 / PROJECTORS_FILE).is_file() and not s2.is_file():
        raise TrainError(f"{run}: no trained projectors (run stage 2, and stage 3 for instruction tuning)")
    model, cfg = build_model(cfg, run, 2, device=str(device))
    if (s3 / PROJECTORS_FILE).is_file():
        model.projectors.load_state_dict(load_safetensors(s3 / PROJECTORS_FILE))
        if (s3 / "lora" / "adapter_config.json").is_file():
            from peft import PeftModel

            model.llm = PeftModel.from_pretrained(model.llm, str(s3 / "lora"))
            if merge:
                model.llm = model.llm.merge_and_unload()
    else:
        model.projectors.load_state_dict(load_safetensors(s2))
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.placement = placement
    return model


def slide_inputs_for(store: str | Path, run_dir: str | Path | None = None,
                     cfg: TrainConfig | None = None) -> SlideInputs:
    """One slide's inputs with the run's encoders and selection (max_regions, k, max_cells).

    With ``run_dir`` the store is first checked against the run's bundle (:func:`hwsi.train.bundle.check_store`):
    a store made another way (encoder, µm/px, region size, SPF settings) is a BundleMismatch, never a silent answer."""
    if run_dir is not None:
        check_stores([Path(store)], run_dir, hint=" (`hwsi ask SLIDE_FILE --run RUN` makes it the run's way)")
    cfg = cfg or run_config(run_dir)  # type: ignore[arg-type]
    m = cfg.model
    return load_slide_inputs(store, cfg.data.patch_encoder, cfg.data.region_input, max_regions=m.max_regions, k=m.k,
                             max_cells=m.max_cells)
