"""hwsi.model — the trainable hierarchy, stage-1 losses, projectors, LLM assembly and inference.

Modules (import from the submodule; this package imports nothing heavy):

* ``inputs``     SlideInputs, SlideBatch, load_slide_inputs, collate_slides, save_slide_inputs, load_cached_inputs
* ``ccaf``       CCAF, CCAFConfig                      (Eq. 4)
* ``vit4k``      ViT4K, ViT4KConfig, load_hipt_vit4k    (HIPT ViT-4K region encoder)
* ``slide_vit``  SlideViT, SlideViTConfig               (ViT_WSI)
* ``hierarchy``  HierarchyConfig, HierarchicalEncoder, HierarchyOutput   (Eq. 5)
* ``heads``      AlignmentHeads, AlignedTokens          (stage-1 z, unit vectors in the text space)
* ``losses``     hca_loss, HCALossConfig, AlignmentTargets, ScaleTargets, assign_positives   (Eq. 6–9)
* ``projectors`` Projectors, ProjectorConfig            (A_c, A_p, A_r, A_WSI + scale markers)
* ``llm``        load_llm, build_tiny_llm
* ``mllm``       MLLMHWSI, MLLMConfig                   (Z = [z_c, z_p, z_r, z_WSI, z_text]; assembly, LM loss)
* ``chat``       ChatSession                            (multi-turn inference, visual prefix cached once)
* ``roi``        select_roi, roi_slide_inputs            (the tokens inside an ROI + the slide token; docs/roi.md;
                 the ROI itself, rectangle / GeoJSON in level-0 px, is ``hwsi.slide.roi_geometry``'s)
"""
