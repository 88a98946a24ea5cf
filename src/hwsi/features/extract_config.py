"""Settings and timings of `hwsi extract` (docs/design.md §4–5); the steps are in :mod:`hwsi.features.extract`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hwsi.devices import DtypeName, check_device_spec, check_dtype_name
from hwsi.errors import ConfigError, HwsiError
from hwsi.features.spf import SPFConfig
from hwsi.store import FEATURE_DTYPES, FeatureDtype

#: the stage name recorded in a finished store and in ``JOB/errors/<id>.extract.json``
STAGE = "extract"


class ExtractError(HwsiError):
    """Extraction cannot run for a slide or with these settings; names the file where there is one."""


@dataclass
class ExtractConfig:
    """Settings of `hwsi extract` (CLI flags of the same names)."""

    patch_encoder: str = "hwsi_small_patch"  # NAME or NAME:CKPT
    region_input: str = "same"  # NAME[:CKPT] or "same"
    text_encoder: str = "minilm"
    cells: str = "builtin"  # builtin | none | cellvit:DIR
    batch_size: int = 64
    threads: int = 2  # reader threads (overlap reading with encoding)
    k: int = 16
    n_div: int = 32
    min_tissue: float = 0.5  # SPF candidates: tissue patches with at least this tissue fraction
    vocab: str | None = None  # vocabulary file; None = the built-in DEFAULT_VOCABULARY
    overwrite: bool = False
    slide_ids: list[str] = field(default_factory=list)  # subset of the job's slides (empty = all)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (hwsi.devices.resolve_placement), for all three encoders
    dtype: DtypeName = "float32"  # the encoders' weights and compute (docs/devices.md)
    feature_dtype: FeatureDtype = "float32"  # patches/<encoder> on disk (float16 halves a store; read as float32)

    def validate(self) -> None:
        SPFConfig(k=self.k, n_div=self.n_div)
        check_device_spec(self.device)
        check_dtype_name(self.dtype)
        check_dtype_name(self.feature_dtype, "--feature-dtype", FEATURE_DTYPES)
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"--min-tissue must be in [0, 1], got {self.min_tissue}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        kind = self.cells.split(":", 1)[0]
        if kind not in ("builtin", "none", "cellvit"):
            raise ConfigError(f"--cells must be builtin, none or cellvit:DIR, got {self.cells!r}")
        if kind == "cellvit" and not self.cells.partition(":")[2]:
            raise ConfigError("--cells cellvit:DIR needs the folder of the CellViT outputs")


@dataclass
class SlideTimings:
    """Seconds spent per step for one slide (read = waiting for pixels from the reader)."""

    read: float = 0.0
    encode: float = 0.0
    region_input: float = 0.0
    spf: float = 0.0
    cells: float = 0.0
    write: float = 0.0
    total: float = 0.0
    n_regions: int = 0
    n_patches: int = 0
    n_selected: int = 0
    n_cells: int = 0

    def add(self, other: SlideTimings) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

