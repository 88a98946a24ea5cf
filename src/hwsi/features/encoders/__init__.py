"""Encoder registry (timm / open_clip style): image encoders for patches and text encoders.

```python
from hwsi.features.encoders import create_encoder, create_text_encoder, list_encoders
enc = create_encoder("hwsi_small_patch", checkpoint="ckpt/")     # or "conch_vit_b16:/path/pytorch_model.bin"
feats = enc.encode(patches_uint8, batch_size=64)                # (N, enc.embed_dim) float32
text = create_text_encoder("minilm").encode(["tumour glands"])  # (1, 384)
```
Registered image encoders: ``conch_vit_b16`` (CONCH image tower, 512-d), ``hipt_vit256`` (HIPT ViT-256, 384-d),
``hwsi_small_patch`` (the CPU default, 384-d, in MiniLM's space once trained with ``hwsi train-encoder``).
Text encoders: ``minilm`` (default), ``conch_text``.
"""

from hwsi.features.encoders.base import (
    CLIP_MEAN,
    CLIP_STD,
    EncoderError,
    ImageEncoder,
    is_own_checkpoint,
    read_own_meta,
    save_encoder,
)
from hwsi.features.encoders.checkpoints import LoadReport, load_foreign_state_dict, read_state_dict
from hwsi.features.encoders.registry import (
    create_encoder,
    create_text_encoder,
    encoder_entry,
    list_encoders,
    list_text_encoders,
    parse_encoder_spec,
    register_encoder,
    register_text_encoder,
)
from hwsi.features.encoders.text import TextEncoder

DEFAULT_PATCH_ENCODER = "hwsi_small_patch"
DEFAULT_TEXT_ENCODER = "minilm"

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_PATCH_ENCODER",
    "DEFAULT_TEXT_ENCODER",
    "EncoderError",
    "ImageEncoder",
    "LoadReport",
    "TextEncoder",
    "create_encoder",
    "create_text_encoder",
    "encoder_entry",
    "is_own_checkpoint",
    "list_encoders",
    "list_text_encoders",
    "load_foreign_state_dict",
    "parse_encoder_spec",
    "read_own_meta",
    "read_state_dict",
    "register_encoder",
    "register_text_encoder",
    "save_encoder",
]
