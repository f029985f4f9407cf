"""Trainer: config -> data, model, optimizer -> jitted steps, clu metrics, orbax checkpoints.

Modules: config_lib (defaults, validation), builders (model, optimizer), steps (loss,
train/eval steps), checkpoint (orbax), flops (cost accounting), writers (clu + JSONL),
trainer (`train_and_evaluate`), main (absl entry point).
"""
