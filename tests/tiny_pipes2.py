"""Tiny offline diffusers pipelines for the drop-in tests: DiT, PixArt-alpha, SD3 and Flux.

Every component is built from a config with random weights (seeded), and every tokenizer from a
hand-made word-level vocabulary, so nothing is downloaded. Latents are 4 x 8 x 8 and the text
sequences a few tokens, so a 3-step ``pipe(...)`` takes well under a second on one CPU core.

What the pipelines do (diffusers 0.42, read from their ``__call__``), which the adapters reproduce:

* ``DiTPipeline(class_labels, guidance_scale=4.0, generator, num_inference_steps, output_type)``:
  one draw ``randn(B, C, s, s)`` from ``generator`` (no ``init_noise_sigma``); under guidance
  (scale > 1) the batch is ``[x, x]`` with labels ``[labels, 1000 x B]`` (cond first, the null
  class second); ``transformer(scale_model_input(x, t), timestep=t.expand(2B), class_labels=...)``;
  guidance ``u + s (c - u)`` on the first C channels only, and the learned-variance channels are
  sliced off when ``out_channels == 2C``. ``scheduler.step`` gets no generator (a stochastic step
  draws from torch's global RNG) and no eta. Decode: ``vae.decode(x / scaling_factor)``, then
  ``(img / 2 + 0.5).clamp(0, 1)`` (no image processor).
* ``PixArtAlphaPipeline(prompt, negative_prompt="", ..., eta, generator, use_resolution_binning)``:
  T5 embeddings + attention mask for the prompt and the negative prompt (uncond first);
  latents ``randn(B n, C, h/f, w/f) * init_noise_sigma`` from ``generator``;
  ``transformer(x_in, encoder_hidden_states=, encoder_attention_mask=, timestep=t.expand(2B),
  added_cond_kwargs={"resolution": None, "aspect_ratio": None})`` (tensors when sample_size is 128);
  guidance on all channels, then the learned-variance half sliced; ``step(..., generator, eta)``.
  Decode: ``vae.decode(x / scaling_factor)``, ``image_processor.postprocess``.
* ``StableDiffusion3Pipeline``: two CLIP encoders (penultimate hidden states, pooled projections
  concatenated) and T5, negative embeddings first; latents ``randn`` from ``generator`` after
  the prompt is encoded; ``set_timesteps(S, sigmas=, mu=)`` (``mu`` from the latent size when the
  scheduler uses dynamic shifting); ``transformer(hidden_states=x, timestep=t.expand(2B) (1000
  sigma), encoder_hidden_states=, pooled_projections=, joint_attention_kwargs=)``; ``step`` gets
  no generator. Decode: ``vae.decode(x / scaling_factor + shift_factor)``, ``postprocess``.
* ``FluxPipeline``: CLIP pooled + T5 embeddings; latents ``randn(B, C, 2 (h/f/2), 2 (w/f/2))``
  packed to ``[B, (h/2)(w/2), 4C]`` tokens with ``img_ids``; ``transformer(hidden_states=packed,
  timestep=t/1000, guidance=g (guidance-distilled models), pooled_projections=, encoder_hidden_states=,
  txt_ids=, img_ids=)``; true CFG only with ``true_cfg_scale > 1`` and a negative prompt (two calls).
"""
from __future__ import annotations

import torch

WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "blurry", "ugly", "house", "tree", "on", "the", "sky")


def word_tokenizer(max_length: int, *, eos: str, pad: str, bos: str | None = None):
    """A ``PreTrainedTokenizerFast`` over :data:`WORDS` (lower-cased, split on whitespace):
    ``[bos] words eos``, padded with ``pad``; unknown words map to ``<unk>``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = [pad, eos, "<unk>"] + ([bos] if bos else [])
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = f"{bos} $A {eos}" if bos else f"$A {eos}"
    special_ids = [(s, vocab[s]) for s in ([bos, eos] if bos else [eos])]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special_ids)
    kw = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token="<unk>",
                                   model_max_length=max_length, **kw)


def tiny_t5(d_model: int = 16, seed: int = 0):
    """A 1-layer ``T5EncoderModel`` and its tokenizer (``</s>`` appended, ``<pad>`` = 0)."""
    from transformers import T5Config, T5EncoderModel

    tok = word_tokenizer(16, eos="</s>", pad="<pad>")
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval(), tok


def tiny_clip(hidden: int, proj: int | None, seed: int):
    """A 2-layer ``CLIPTextModelWithProjection`` (``CLIPTextModel`` when ``proj`` is None) and its
    tokenizer (``<|startoftext|> words <|endoftext|>``, padded with ``<|endoftext|>`` to 8 tokens,
    as CLIP pads)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = word_tokenizer(8, eos="<|endoftext|>", pad="<|endoftext|>", bos="<|startoftext|>")
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=8, projection_dim=proj or hidden,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cls = CLIPTextModel if proj is None else CLIPTextModelWithProjection
    return cls(cfg).eval(), tok


def tiny_vae(latent_channels: int = 4, seed: int = 0, **config):
    """A one-block ``AutoencoderKL`` (scale factor 1: latents are the image's size) without the
    mid-block attention (quadratic in the pixels: PixArt's binned 256 x 256 images)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=8,
                         mid_block_add_attention=False, **config).eval()


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_dit(scheduler=None, *, learned_sigma: bool = True, seed: int = 0):
    """``DiTPipeline``: a 1-layer ``DiTTransformer2DModel`` on 4 x 8 x 8 latents (out_channels 8:
    learned variance), 1000 classes plus the null class, default scheduler DDIM."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                        out_channels=8 if learned_sigma else 4, num_layers=1, sample_size=8,
                                        patch_size=2, num_embeds_ada_norm=1000).eval()
    labels = {i: f"class{i}" for i in range(1000)}
    scheduler = scheduler or DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    return _quiet(DiTPipeline(transformer=transformer, vae=tiny_vae(seed=seed + 1), scheduler=scheduler,
                              id2label=labels))


def tiny_pixart(scheduler=None, *, sample_size: int = 8, patch_size: int = 2, seed: int = 0):
    """``PixArtAlphaPipeline``: a 1-layer ``PixArtTransformer2DModel`` (sample size 8, learned
    variance) with a tiny T5; call it with ``use_resolution_binning=False`` (binning knows the
    sample sizes 32/64/128 only) and a small ``max_sequence_length``. Default scheduler DDIM.
    ``sample_size=128`` (with a large ``patch_size`` to keep the tokens few) makes PixArt-alpha
    condition on resolution and aspect ratio."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    t5, tok = tiny_t5(seed=seed + 2)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8,
                                           num_layers=1, sample_size=sample_size, patch_size=patch_size,
                                           cross_attention_dim=24,
                                           caption_channels=t5.config.d_model).eval()
    scheduler = scheduler or DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    return _quiet(PixArtAlphaPipeline(tokenizer=tok, text_encoder=t5, vae=tiny_vae(seed=seed + 1),
                                      transformer=transformer, scheduler=scheduler))


def tiny_sd3(scheduler=None, *, seed: int = 0):
    """``StableDiffusion3Pipeline``: a 1-layer ``SD3Transformer2DModel`` on 4 x 8 x 8 latents, two
    CLIP encoders (hidden 8, projections 8 + 8) and a T5 of width 16; default scheduler
    ``FlowMatchEulerDiscreteScheduler(shift=3)``. Call it with a small ``max_sequence_length``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip1, tok1 = tiny_clip(8, 8, seed=seed + 3)
    clip2, tok2 = tiny_clip(8, 8, seed=seed + 4)
    t5, tok3 = tiny_t5(seed=seed + 2)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
                                        pos_embed_max_size=8).eval()
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0)
    vae = tiny_vae(seed=seed + 1, scaling_factor=1.5, shift_factor=0.1)
    return _quiet(StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                           text_encoder=clip1, tokenizer=tok1, text_encoder_2=clip2,
                                           tokenizer_2=tok2, text_encoder_3=t5, tokenizer_3=tok3))


def tiny_flux(scheduler=None, *, guidance_embeds: bool = True, seed: int = 0):
    """``FluxPipeline``: a ``FluxTransformer2DModel`` with one double and one single block on packed
    4 x 8 x 8 latents (16 tokens of 16 channels), guidance-distilled (``guidance_embeds``), a CLIP
    text model (pooled, hidden 8) and a T5 of width 16; default scheduler flow-matching Euler with
    dynamic shifting, as FLUX.1-dev ships. Call it with ``height=8, width=8`` (the default is 128
    latent pixels) and a small ``max_sequence_length``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip, tok = tiny_clip(8, None, seed=seed + 3)
    t5, tok2 = tiny_t5(seed=seed + 2)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6)).eval()
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                             max_shift=1.15, base_image_seq_len=256,
                                                             max_image_seq_len=4096)
    vae = tiny_vae(seed=seed + 1, scaling_factor=0.3611, shift_factor=0.1159)
    return _quiet(FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                               tokenizer_2=tok2, transformer=transformer))
