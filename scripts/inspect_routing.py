r"""Pictures of where every patch or token went, from any finished or interrupted workdir.

    python -m scripts.inspect_routing --workdir=workdirs/demo
    python -m scripts.inspect_routing --workdir=workdirs/demo_lm --examples=3 --out=/tmp/pics
    python -m scripts.inspect_routing --workdir=DIR --mode=train   # routing as in training

Runs the run's model (its latest checkpoint, or --step) on the first eval batch and
writes, into --out (default <workdir>/routing):

    load_train.png, load_eval.png  each MoE layer's expert load over training (steps x
                                   experts, load x E; 1 = balanced), dropped fraction beneath
    ViT        patch_experts.png   the first --examples images, every patch coloured by
                                   its expert per MoE layer (x: a dropped choice)
               <layer>.soft_slots.png   Soft MoE: slots' dispatch weights over the image,
                                   each patch's largest combine weight
    LM         <layer>.tokens.png / .html    tokens coloured by expert (hover in HTML)
               <layer>.top_tokens.png / .md / .html   each expert's most frequent tokens
                                   (over the first --rows rows of the batch)
    index.html                     everything on one page

Works for every router of `layers.ROUTERS` and both model families; --mode=train shows
the training-mode routing (router noise, BASE's balanced assignment, DSelect-k's dense
gates) instead of the evaluation one. Layer names are the logged ones ('block_03',
'encoder/block_01', 'decoder/block_03'; '/' becomes '.' in file names).
"""
from __future__ import annotations

import argparse
import html
import os

import numpy as np

from moe_jax import tasks
from moe_jax.inspection import load, views as views_lib
from moe_jax.inspection.pictures import html_page
from moe_jax.train import workdir as workdir_lib
from moe_jax.train import writers


def pictures(workdir: str, *, examples: int = 4, mode: str = 'eval', rows: int = 64,
             step: int | None = None) -> list:
  """Every routing picture of `workdir` (module docstring), as `Picture`s."""
  if mode not in ('eval', 'train'):
    raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}.")
  model, config = workdir_lib.load_model(workdir, step)
  task = tasks.TASKS[config.task.name](config)
  task.prepare()
  batch = next(iter(task.eval_batches()))
  batch = {k: np.asarray(v)[:max(rows, examples)] for k, v in batch.items()}
  model.train() if mode == 'train' else model.eval()
  views = views_lib.routing_views(model, task.model_inputs(batch))
  if not views:
    print(f'{workdir}: the model has no MoE layer; only the load pictures (if any) are drawn.')
  out = list(task.routing_pictures(batch, views, num_examples=examples))
  records = writers.read_jsonl(workdir)
  for split in ('train', 'eval'):
    heat = load.load_picture(records, split)
    if heat is not None:
      out.append(heat)
  return out


def write(pics: list, out_dir: str, title: str) -> list[str]:
  """Writes every picture and index.html (all of them on one page); returns the paths."""
  paths, body = [], [f'<h1>{html.escape(title)}</h1>']
  for pic in pics:
    paths += pic.write(out_dir)
    body.append(f'<h2>{html.escape(pic.name)}</h2>')
    if pic.png is not None:
      body.append(f'<img src="{html.escape(pic.stem)}.png" style="max-width:100%">')
    if pic.html is not None:
      body.append(pic.html)
  index = os.path.join(out_dir, 'index.html')
  with open(index, 'w') as f:
    f.write(html_page(title, '\n'.join(body)))
  return paths + [index]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--examples', type=int, default=4, help='examples drawn (images, sequences)')
  p.add_argument('--out', default=None, help='default <workdir>/routing')
  p.add_argument('--mode', default='eval', choices=('eval', 'train'),
                 help='route as in evaluation (default) or as in training')
  p.add_argument('--rows', type=int, default=64, help='batch rows the top-token tables count')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  args = p.parse_args(argv)
  out = args.out or os.path.join(args.workdir, 'routing')
  pics = pictures(args.workdir, examples=args.examples, mode=args.mode, rows=args.rows,
                  step=args.step)
  paths = write(pics, out, f'routing of {os.path.basename(os.path.normpath(args.workdir))} '
                f'({args.mode} mode)')
  for path in paths:
    print(path)
  return paths


if __name__ == '__main__':
  main()
