"""Tiny offline pipelines for the drop-in tests: the builders the benchmark uses too
(:mod:`deqkern.bench.tiny_pipes`), under the name the tests import."""
from deqkern.bench.tiny_pipes import IMAGE, MAX_TOKENS, sd_pipeline, sdxl_pipeline, text_encoder, tokenizer, unet, vae

__all__ = ["IMAGE", "MAX_TOKENS", "sd_pipeline", "sdxl_pipeline", "text_encoder", "tokenizer", "unet", "vae"]
