"""The paper-reproduction harness on top of the library: data (the shipped general text and domain
multiple-choice sets, hub loaders), models (SmolLM2 from GGUF, any Hugging Face causal LM), eval
(perplexity, multiple-choice accuracy), the methods compared (LoRA variants, HLoRA, and the baselines
in ``baselines/``), the comparison itself (``experiment``), seeded grids (``grid``, ``stats``),
hyperparameter selection, plots, step checkpoints for the CLI, and the benchmarks.

The library (``hlora``, ``hlora.hf``) never imports anything from here.
"""
