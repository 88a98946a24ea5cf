"""hwsi.store: the only owner of the per-slide HDF5 store — writer, typed reader, schema check, atomic updates."""

from __future__ import annotations

import ast
from pathlib import Path

import h5py
import numpy as np
import pytest

from hwsi.errors import StoreError
from hwsi.model.inputs import load_slide_inputs
from hwsi.store import SCHEMA_VERSION, SlideStore, StoreMeta, has_stage, new_store, read_store_meta, update_store
from store_builder import write_extracted_store

SRC = Path(__file__).resolve().parents[1] / "src" / "hwsi"

# modules outside hwsi.store that use h5py for ANOTHER file format (never for the slide store), with the format
OTHER_HDF5_FORMATS = {
    "synth/truth.py": "the SynthPath ground-truth sidecar <slide>.truth.h5 (layout in its docstring)",
    "features/import_features.py": "TRIDENT / CLAM patch-feature files read by `hwsi import-features`",
    "cells/export.py": "the nucleus table written by `hwsi cells --out X.h5` (table/<column>, features)",
}


def _imports(path: Path) -> set[str]:
    """Top-level module names imported anywhere in ``path`` (function-level imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_only_hwsi_store_imports_h5py() -> None:
    offenders, seen = [], set()
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("store/"):
            continue
        if any(m == "h5py" or m.startswith("h5py.") for m in _imports(path)):
            if rel in OTHER_HDF5_FORMATS:
                seen.add(rel)
            else:
                offenders.append(rel)
    assert not offenders, f"open slide stores through hwsi.store, not h5py: {offenders}"
    assert seen == set(OTHER_HDF5_FORMATS), "an exempt module no longer uses h5py: drop it from OTHER_HDF5_FORMATS"


def test_store_package_is_the_lowest_layer() -> None:
    for path in sorted((SRC / "store").glob("*.py")):
        hwsi = {m for m in _imports(path) if m == "hwsi" or m.startswith("hwsi.")}
        bad = {m for m in hwsi if not (m in ("hwsi", "hwsi.errors") or m.startswith(("hwsi.utils", "hwsi.store")))}
        assert not bad, f"{path.name} imports {bad}"
        assert len(path.read_text().splitlines()) < 400, path.name


def _meta(path: Path, **kw: object) -> StoreMeta:
    return StoreMeta("/slides/s.tiff", path.stem, 0.25, 0.5, 0.5, 512, 256, 1024.0, 512.0, 4096, 2048, **kw)


def _small(path: Path) -> dict[str, np.ndarray]:
    """An extracted store of 2 regions x 4 patches, 3 cells in patch (0, 1) and 2 in (1, 3)."""
    rng = np.random.default_rng(0)
    rc = np.array([[0, 0], [1024, 0]], np.int64)
    pc = rc[:, None] + np.array([[0, 0], [512, 0], [0, 512], [512, 512]])[None]
    a = {"rc": rc, "pc": pc, "feat": rng.normal(size=(2, 4, 6)).astype(np.float32),
         "sel": np.array([[1, 0], [3, -1]], np.int32), "rel": rng.uniform(size=(2, 4)).astype(np.float32),
         "counts": np.array([0, 3, 0, 0, 0, 0, 0, 2]), "emb": rng.normal(size=(5, 3)).astype(np.float32)}
    write_extracted_store(path, region_coords=rc, patch_coords=pc, features={"enc": a["feat"]}, selected=a["sel"],
                          relevance=a["rel"], cell_counts=a["counts"], cell_embeddings=a["emb"],
                          region_size_level0=1024.0, attrs={"patch_encoder": "enc"})
    return a


def test_typed_accessors_read_what_the_writer_wrote(tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    a = _small(p)
    with SlideStore(p) as s:
        assert s.meta.slide_id == "s" and s.meta.grid_side == 2 and s.meta.encoders == {"enc": 6}
        assert s.stages == ["tile", "features", "spf", "cells", "extract"] and s.attr("patch_encoder") == "enc"
        assert s.n_regions == 2 and s.region_coords().dtype == np.int64
        np.testing.assert_array_equal(s.patch_coords(), a["pc"])
        assert s.patch_tissue().dtype == bool and s.patch_tissue().all()
        np.testing.assert_array_equal(s.patch_features("enc"), a["feat"])
        np.testing.assert_array_equal(s.patch_features("enc", 1), a["feat"][1])
        assert s.feature_dim("enc") == 6 and s.has_features("enc") and not s.has_features("uni")
        np.testing.assert_array_equal(s.spf_selected(), a["sel"])
        assert s.spf_selected().dtype == np.int64
        np.testing.assert_array_equal(s.spf_relevance(), a["rel"])
        assert s.cell_offsets().tolist() == [0, 0, 3, 3, 3, 3, 3, 3, 5]
        assert s.cell_counts().tolist() == [[0, 3, 0, 0], [0, 0, 0, 2]]
        cols, emb = s.cells_of(1, 3)
        np.testing.assert_array_equal(emb, a["emb"][3:5])
        assert cols["region"].tolist() == [1, 1] and s.cell_column("patch", 0, 3).tolist() == [1, 1, 1]
        with pytest.raises(StoreError, match=r"s\.h5: no patch features 'uni'"):
            s.patch_features("uni")
        with pytest.raises(StoreError, match=r"s\.h5: missing dataset 'tissue/thumbnail' \(run `hwsi tile`\)"):
            s.thumbnail()
        assert s.tissue_mask() is None


def test_tissue_mask_and_thumbnail(tmp_path: Path) -> None:
    p = tmp_path / "t.h5"
    thumb = np.full((4, 8, 3), 200, np.uint8)
    with new_store(p, _meta(p)) as w:
        w.write_tissue_mask(np.eye(4, 8), downsample=512.0, mpp=128.0, saturation_threshold=0.1)
        w.write_thumbnail(thumb, 512.0)
    with SlideStore(p) as s:
        mask, name = s.tissue_mask()
        assert name == "tissue/mask" and mask.dtype == bool and mask.sum() == 4
        got, ds = s.thumbnail()
        assert ds == 512.0 and np.array_equal(got, thumb)
        assert s.dataset_info("tissue/mask")[2] == {"downsample": 512.0, "mpp": 128.0, "saturation_threshold": 0.1}


def _set_schema(path: Path, version: int) -> None:
    with h5py.File(path, "r+") as f:  # damaging the file on purpose
        f.attrs["schema_version"] = version


def test_schema_version_is_checked_on_every_open(tmp_path: Path) -> None:
    p = tmp_path / "old.h5"
    _small(p)
    _set_schema(p, SCHEMA_VERSION + 1)
    msg = rf"old\.h5: schema_version {SCHEMA_VERSION + 1}, this hwsi reads {SCHEMA_VERSION}"
    for read in (SlideStore, read_store_meta, lambda q: load_slide_inputs(q, "enc", "enc")):
        with pytest.raises(StoreError, match=msg):
            read(p)
    with pytest.raises(StoreError, match=msg), update_store(p):
        pass
    assert not list(tmp_path.glob("*.tmp-*"))


def test_not_a_store_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"nope\.h5: no such store"):
        SlideStore(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match=r"junk\.h5: not a readable HDF5 file"):
        SlideStore(tmp_path / "junk.h5")


def test_update_is_atomic(tmp_path: Path) -> None:
    p = tmp_path / "u.h5"
    _small(p)
    with update_store(p) as w:
        w.write_features("uni", np.ones((2, 4, 2), np.float32))
        w.set_encoder("uni", 2)
        w.mark_stage("import")
    assert has_stage(p, "import") and read_store_meta(p).encoders == {"enc": 6, "uni": 2}
    with pytest.raises(RuntimeError), update_store(p) as w:
        w.write_features("uni", np.zeros((2, 4, 2), np.float32))
        w.drop_stage("import")
        raise RuntimeError("killed half-way")
    with SlideStore(p) as s:  # the original is untouched, nothing is left behind
        assert "import" in s.stages and (s.patch_features("uni") == 1).all()
    assert not list(tmp_path.glob("*.tmp-*"))
