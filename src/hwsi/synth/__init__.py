"""hwsi.synth — SynthPath: procedural H&E-like slides whose ground truth is known at every scale.

* :mod:`~hwsi.synth.classes` — diagnoses and which scale owns each fact (atypia: cell; glands: patch;
  architecture: region; extent: slide); see ``docs/synthpath.md``.
* :mod:`~hwsi.synth.scene` — :class:`SceneConfig` / :class:`Scene`: regions, patch patterns, nuclei by seed.
* :mod:`~hwsi.synth.render` — :func:`render_window` (any level-0 window, streaming ``tile_fn``).
* :mod:`~hwsi.synth.truth` — ``<slide>.truth.h5`` sidecar (cells, patches, regions, slide facts).
* :mod:`~hwsi.synth.text` — reports, captions, VQA in WSI-Bench format.
* :mod:`~hwsi.synth.cohort` — :func:`write_slide`, :func:`write_cohort` (``hwsi synth``).
* :mod:`~hwsi.synth.patches` — :func:`sample_patch_dataset` for the CLIP-style patch encoder.
* :mod:`~hwsi.synth.pyramid` — the pyramidal TIFF writer (the format :mod:`hwsi.slide` reads).

Heavy modules are not imported here; import them from their submodules.
"""
