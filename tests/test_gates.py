"""Each scale's encoder can learn the fact its scale owns (supervised ceilings on held-out slides), and stage 1
puts those facts into its tokens (probes beside random init and the raw input): docs/design.md §5."""

from __future__ import annotations

import pytest

from hwsi.demo.gates import GateConfig, gate_cells, gate_regions, gate_slide, load_gate_slides
from hwsi.demo.probes import probe_stage1


@pytest.fixture(scope="module")
def gate_slides(test_pipeline):
    return load_gate_slides(test_pipeline.paths.out)


def test_region_gate_needs_the_arrangement_stem(gate_slides) -> None:
    """HIPT's ViT-4K alone cannot learn crowded vs regular from ~200 regions; with the conv stem it can."""
    conv = GateConfig()
    conv.vit4k.stem, conv.vit4k.pos_grid = "conv", 16
    plain = GateConfig()
    plain.vit4k.stem, plain.vit4k.pos_grid = "linear", 16
    got, base = gate_regions(gate_slides, conv), gate_regions(gate_slides, plain)
    print("region gate:", got, "\nlinear stem:", base)
    assert got.balanced_accuracy >= 0.9 and got.n_test >= 40, got
    assert base.balanced_accuracy < got.balanced_accuracy - 0.2, base
    assert got.raw_balanced_accuracy < 0.75  # the mean-pooled input cannot tell an arrangement


def test_cell_and_slide_gates(gate_slides) -> None:
    cfg = GateConfig()
    cfg.vit4k.stem, cfg.vit4k.pos_grid = "conv", 16
    cells, slide = gate_cells(gate_slides, cfg), gate_slide(gate_slides, cfg)
    print("cell gate:", cells, "\nslide gate:", slide)
    assert cells.balanced_accuracy >= 0.9, cells
    assert slide.balanced_accuracy >= 0.9 and slide.n_test >= 20, slide


def test_stage1_probes_beat_random_init_where_an_encoder_learns(test_pipeline) -> None:
    """Regions and slide: the trained stage-1 z beats the same probe at random init and on the raw input."""
    res = {r.scale: r for r in probe_stage1(test_pipeline.paths.out, test_pipeline.paths.runs)}
    print({k: (round(v.trained, 3), round(v.random_init, 3), round(v.raw, 3)) for k, v in res.items()})
    for scale in ("regions", "slide"):
        r = res[scale]
        assert r.trained > r.random_init and r.trained > r.raw, r
