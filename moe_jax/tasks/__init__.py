"""Tasks: one file per kind of training (data, batch keys, loss, eval metrics).

    task = TASKS[config.task.name](config)

The registry is an explicit dict; a new task is one file and one line here.
"""
from moe_jax.tasks.base import Task
from moe_jax.tasks.image_classification import ImageClassification

TASKS = {
    'image_classification': ImageClassification,
}

__all__ = ['TASKS', 'Task', 'ImageClassification']
