"""hwsi.nn — neural-network blocks shared by more than one stage (:mod:`hwsi.features` encoders and
:mod:`hwsi.model`): :mod:`hwsi.nn.transformer` (pre-norm transformer block, attention, MLP, patch embedding, ViT
initialisation) and :mod:`hwsi.nn.pos_embed` (position-table resampling). Imports torch."""
