"""Models built from `moe_jax.layers`: a ViT (V-MoE / Soft MoE placements)."""
from moe_jax.models.placement import moe_block_indices
from moe_jax.models.token_ids import TOKEN_ID_FNS
from moe_jax.models.vit import PAPER_MOE, PRESETS, ViT, extract_patches

__all__ = ['PAPER_MOE', 'PRESETS', 'TOKEN_ID_FNS', 'ViT', 'extract_patches', 'moe_block_indices']

# config.model.name -> model class; built as MODELS[name](**other fields of config.model, rngs=...).
MODELS = {'vit': ViT}

__all__ += ['MODELS']
