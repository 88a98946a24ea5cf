"""The wheel carries the presets: build it, install it into a fresh venv, and run it from outside the checkout.

The presets live in ``src/hwsi/configs/`` as package data (``pyproject.toml`` ``[tool.setuptools.package-data]``)
and are found through :mod:`importlib.resources` (:func:`hwsi.config.preset_path`); this test fails when one of
them is not in the wheel, or when the installed package still reaches for files of the checkout.

How the fresh venv gets the heavy dependencies (torch, transformers, ...) without reinstalling them, while the
checkout's own hwsi stays invisible to it:

1. the wheel is built from a COPY of ``pyproject.toml``, ``README.md`` and ``src/`` (so no ``build/`` or
   ``*.egg-info`` lands in the checkout), offline: ``pip wheel --no-deps --no-build-isolation --no-index`` with the
   setuptools of the running venv;
2. ``python -m venv --without-pip VENV`` makes a bare venv, and the running venv's pip installs the wheel into it
   (``pip --python VENV/bin/python install --no-deps --no-index``) BEFORE anything else is visible there, so pip
   neither sees nor touches the editable hwsi of the running venv;
3. then one ``.pth`` file in VENV's site-packages names the running venv's site-packages. A path line of a ``.pth``
   file only appends that folder to ``sys.path``: the ``.pth`` files inside it are not processed, so the editable
   install's ``__editable__.hwsi-*.pth`` (which would put a checkout's ``src/`` on ``sys.path``) never runs, and
   VENV's own site-packages (holding the wheel's hwsi) comes first. ``--system-site-packages`` would not do: it
   exposes the base interpreter's site-packages, not the project venv's.

The children run with ``PYTHONPATH`` removed and from a folder outside the checkout; the snippet checks that
``hwsi`` is imported from VENV. About 25 s on 2 busy cores (pip, then torch imported by the children), so it
stays in the default suite (`make test`). Needs the build backend (setuptools) in the running venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "src" / "hwsi" / "configs"

pytest.importorskip("setuptools", reason="building the wheel offline needs the build backend in this venv")

SNIPPET = """
import json, hwsi
from hwsi.config import preset_names, preset_path, shipped_file
from hwsi.train.config import TrainConfig, load_train_config
loaded = {n: isinstance(load_train_config(n), TrainConfig) for n in preset_names()}
print(json.dumps({"hwsi": hwsi.__file__, "presets": preset_names(), "loaded": loaded,
                  "tiny": str(preset_path("tiny")),
                  "zero": json.loads(shipped_file("deepspeed_zero3.json").read_text())["zero_optimization"]["stage"]}))
"""


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (f"{' '.join(map(str, argv))} -> {res.returncode}\n{res.stdout[-2000:]}\n"
                                 f"{res.stderr[-3000:]}")
    return res


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "source"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(src)], cwd=tmp)
    (wheel,) = dist.glob("hwsi-*.whl")
    return wheel


def _venv_with_wheel(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         cwd=tmp)
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp)
                .stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # the running venv's
    (site / "_hwsi_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    return venv


def test_wheel_ships_every_preset_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    checkout_presets = sorted(p.name for p in PRESETS.iterdir() if p.is_file())
    assert {"tiny.yaml", "demo.yaml", "paper.yaml", "deepspeed_zero3.json"} <= set(checkout_presets)
    in_wheel = sorted(Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.startswith("hwsi/configs/"))
    assert in_wheel == checkout_presets

    venv = _venv_with_wheel(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    res = _run([str(venv / "bin" / "hwsi"), "demo", "--help"], cwd=elsewhere, env=env)
    assert "Usage" in res.stdout and "demo" in res.stdout

    out = json.loads(_run([str(venv / "bin" / "python"), "-c", SNIPPET], cwd=elsewhere, env=env).stdout)
    assert Path(out["hwsi"]).is_relative_to(venv), out["hwsi"]  # the wheel's copy, not the checkout's
    assert Path(out["tiny"]).is_relative_to(venv)
    assert out["presets"] == sorted(p.removesuffix(".yaml") for p in checkout_presets if p.endswith(".yaml"))
    assert all(out["loaded"].values()) and out["zero"] == 3
