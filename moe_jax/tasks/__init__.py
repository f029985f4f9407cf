"""Tasks: one file per kind of training (data, batch keys, loss, eval metrics).

    task = TASKS[config.task.name](config)

The registry is an explicit dict; a new task is one file and one line here.
"""
from moe_jax.tasks.base import Task
from moe_jax.tasks.image_classification import ImageClassification
from moe_jax.tasks.text import CausalLm, SpanCorruption

TASKS = {
    'image_classification': ImageClassification,
    'causal_lm': CausalLm,
    'span_corruption': SpanCorruption,
}

__all__ = ['TASKS', 'Task', 'CausalLm', 'ImageClassification', 'SpanCorruption']
