"""hwsi: MLLM-HWSI, a hierarchical multimodal LLM for pathology whole-slide images.

Data flow (one package per stage, lower stages never import higher ones)::

    slide/ -> cells/ -> features/ -> model/ -> train/ -> eval/ -> serve/

``synth/`` writes SynthPath slides; ``store`` is the per-slide HDF5 schema shared by all stages.
"""

__version__ = "0.1.0"
