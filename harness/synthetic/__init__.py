"""The synthetic sandbox: a multimodal world the project generates, and the embedded models trained on it.

Real targets (LLaVA-v1.5-7B, Bunny-v1.0-3B) cannot be downloaded on CPU-only machines
without a model hub, so the harness carries its own small study: `world.py` draws
scenes of shapes on a grid and asks questions about them, `make.py` writes the
instruction mix and six benchmarks shaped like GQA, POPE, MME, ScienceQA, counting and
DocVQA (`harness data make`), `tasks/` holds their lmms-eval task YAMLs and hooks,
`models.py` specifies the LLaVA- and Bunny-shaped embedded models, and `teachers.py`
trains them as LLaVA is trained (`vision_pretrain.py` stands in for CLIP/SigLIP
pretraining, `grow.py` grows a shallow language model to full depth). Everything else in
the harness runs on these exactly as on the real models.
"""
