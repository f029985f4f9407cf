"""Models built from `moe_jax.layers`: a ViT (V-MoE / Soft MoE placements), a T5.1.1-style
encoder-decoder and a decoder-only LM, all from the parts in `models.transformer`.

`MODELS` is the registry the trainer builds from: `MODELS[config.model.name](**fields, rngs=...)`
with every other field of `config.model` as a constructor keyword.
"""
from moe_jax.models.placement import moe_block_indices
from moe_jax.models.t5 import DECODER_PRESETS, Decoder, EncoderDecoder
from moe_jax.models.token_ids import TOKEN_ID_FNS
from moe_jax.models.vit import PAPER_MOE, PRESETS, ViT, extract_patches

MODELS = {'vit': ViT, 'encoder_decoder': EncoderDecoder, 'decoder': Decoder}

__all__ = ['DECODER_PRESETS', 'Decoder', 'EncoderDecoder', 'MODELS', 'PAPER_MOE', 'PRESETS',
           'TOKEN_ID_FNS', 'ViT', 'extract_patches', 'moe_block_indices']
