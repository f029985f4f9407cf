"""Pictures of routing: where every patch or token went, and expert load over training.

    views.py        per-token views of every MoE layer's `Routing` (jax; used in jit)
    pictures.py     the `Picture` type, expert colours, figure -> RGB
    load.py         load heat map (steps x experts per layer, dropped fraction beneath)
    images.py       ViT: patches coloured by expert; Soft MoE slot heat maps
    text.py         language models: tokens coloured by expert (HTML, PNG), top tokens

Drawing modules import matplotlib (Agg) when imported; `views` imports jax and flax
only, so the train step can use it without loading matplotlib. Tasks choose the
pictures (`Task.routing_pictures`); the trainer writes them to TensorBoard at every
evaluation, `python -m scripts.inspect_routing` to files.
"""
