"""hwsi.features — frozen features per scale, SPF (paper §3.3 Eq. 1–2) and `hwsi extract` (docs/design.md §4–5).

```python
from hwsi.features import spf_select, load_vocabulary, entities_from_report
res = spf_select(patch_feats, text_emb, k=16, n_div=32, candidates=tissue)   # Eq. 1 + diversity + Eq. 2
```
* :mod:`hwsi.features.encoders` — registry of image/text encoders (CONCH, HIPT ViT-256, small patch CNN, MiniLM);
* :mod:`hwsi.features.spf` — Semantic Patch Filtering; :mod:`hwsi.features.vocab` — the fixed SPF vocabulary;
* :mod:`hwsi.features.extract` — `hwsi extract` (patch features, region input, SPF, cells of R̂_i per slide store),
  over :mod:`~hwsi.features.extract_config`, :mod:`~hwsi.features.frozen_models`, :mod:`~hwsi.features.region_stream`,
  :mod:`~hwsi.features.slide_extraction` (one slide) and :mod:`~hwsi.features.extract_cells` (the cells step);
* :mod:`hwsi.features.import_features` — `hwsi import-features` (TRIDENT / CLAM features files).

Heavy modules (torch, h5py) are imported on use, not here.
"""

from hwsi.features.spf import SPFBatch, SPFConfig, SPFError, SPFResult, spf_select, spf_select_regions
from hwsi.features.vocab import DEFAULT_VOCABULARY, entities_from_report, load_vocabulary, vocabulary_fingerprint

__all__ = [
    "DEFAULT_VOCABULARY",
    "SPFBatch",
    "SPFConfig",
    "SPFError",
    "SPFResult",
    "entities_from_report",
    "load_vocabulary",
    "spf_select",
    "spf_select_regions",
    "vocabulary_fingerprint",
]
