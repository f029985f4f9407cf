"""Sparse upcycling (Komatsuzaki et al. 2023): a trained dense model -> its MoE model.

    dense = load_dense_params('workdirs/dense')            # {path tuple: array}
    upcycle_params(dense, moe_params)                       # pure dict of the MoE model
    state = upcycle_train_state(config, nnx.state((model, optimizer)))   # the trainer's hook

Works for any model whose MoE layers sit where the dense model has its MLP (the shared
transformer MLP keeps its kernels as fc1, fc2 and fc_gate): every expert of an MoE layer
starts as a copy of the dense MLP at the same module path (fc1 -> w_in, b_in; fc_gate ->
w_gate; fc2 -> w_out, b_out, the same weights in all E experts); every other parameter
(embeddings, attention, norms, heads, dense blocks) is copied; the router is freshly
initialised, and so are the optimizer state and any non-trainable router state (RNG
counters, DeepSeek's bias, REINFORCE's baseline). The MoE model must have the dense
model's shapes, the same MLP activation / GLU / biases, and expert_hidden = the dense
MLP width (an error names the parameter otherwise).

Function-preserving at init only where each token's combine weights sum to 1 and no
token is dropped (e.g. tokens choice with k >= 2 renormalised gates and ample capacity:
the output is a convex mix of identical MLPs). Top-1 routers scale the MLP by the gate,
drops zero it, and Soft MoE applies the MLP to slot mixtures of tokens, so those start
near, not at, the dense function (the paper notes this for Soft MoE-style mixing too).

Trainer: `config.init_from.dense_workdir=...` (with `init_from.mode='upcycle'`) makes a
run whose workdir holds no checkpoint of its own start from the upcycled weights;
`scripts/upcycle.py` writes that initial state as a step-0 checkpoint instead.
"""
from __future__ import annotations


import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_jax.train import checkpoint

# Expert parameter <- dense MLP parameter at the same module path (broadcast over E).
EXPERT_FROM_DENSE = {('experts', 'w_in'): ('fc1', 'kernel'), ('experts', 'b_in'): ('fc1', 'bias'),
                     ('experts', 'w_gate'): ('fc_gate', 'kernel'),
                     ('experts', 'w_out'): ('fc2', 'kernel'), ('experts', 'b_out'): ('fc2', 'bias')}


def load_dense_params(dense_workdir: str) -> dict:
  """The model variables of the latest checkpoint in a dense run's workdir.

  Returns:
    {path: np.ndarray}, paths like ('blocks', '3', 'mlp', 'fc1', 'kernel').
  """
  flat = checkpoint.read_model_variables(dense_workdir)
  if flat is None:
    raise ValueError(f'init_from.dense_workdir={dense_workdir!r} holds no checkpoint: train '
                     'the dense model there first (router=dense).')
  return flat


def upcycle_params(dense: dict, moe: dict) -> dict:
  """MoE model variables initialised from a dense model's parameters.

  Args:
    dense: {path: array} of the dense model (`load_dense_params`).
    moe: {path: array} of the freshly initialised MoE model (any variables: leaves the
      dense model lacks, such as routers and RNG state, are kept).
  Returns:
    A new {path: array}: experts = copies of the dense MLP, shared parameters copied.
  """
  out, used = dict(moe), set()
  for path, value in moe.items():
    src, expert = path, False
    for tail, dense_tail in EXPERT_FROM_DENSE.items():
      if path[-2:] == tail:
        src, expert = path[:-2] + dense_tail, True
    if src not in dense:
      if expert:
        raise ValueError(f'upcycling: the dense checkpoint has no {"/".join(src)} for '
                         f'{"/".join(path)}; are the two configs the same model?')
      continue                                   # router, RNG counters, ...: stay fresh
    d = np.asarray(dense[src])
    if expert:
      if np.shape(value)[1:] != d.shape:
        raise ValueError(f'upcycling: expert parameter {"/".join(path)} {np.shape(value)} does '
                         f'not stack the dense {"/".join(src)} {d.shape}; set the MoE '
                         "expert_hidden to the dense MLP's width.")
      d = np.broadcast_to(d, np.shape(value))
    elif np.shape(value) != d.shape:
      raise ValueError(f'upcycling: {"/".join(path)} has shape {np.shape(value)} in the MoE '
                       f'model but {d.shape} in the dense checkpoint; use the same model sizes.')
    out[path] = jnp.asarray(d, dtype=jnp.asarray(value).dtype)
    used.add(src)
  unused = sorted('/'.join(p) for p in set(dense) - used)
  if unused:
    raise ValueError(f'upcycling: dense parameters {unused} have no place in the MoE model; '
                     'is the dense checkpoint from the same model (and are MoE blocks MLPs)?')
  return out


def upcycle_train_state(config: ml_collections.ConfigDict, state: nnx.State) -> nnx.State:
  """The trainer's fresh `nnx.state((model, optimizer))` with upcycled model weights.

  The optimizer part is returned untouched (fresh: step 0, zero moments).
  """
  model_state = state[0]
  pure = nnx.to_pure_dict(model_state)
  flat = checkpoint.flatten_state(pure)
  if not any(p[-2:] in EXPERT_FROM_DENSE for p in flat):
    raise ValueError('config.init_from: upcycling needs an MoE model (the config has no MoE '
                     'layer: set a router other than dense).')
  new = upcycle_params(load_dense_params(config.init_from.dense_workdir), flat)
  nnx.replace_by_pure_dict(model_state, checkpoint.unflatten_like(pure, new))
  return state


def initial_meta(config: ml_collections.ConfigDict, dense_workdir: str) -> dict:
  """Checkpoint meta of a step-0 state (what the trainer writes before its first step)."""
  return dict(step=0, data={'seed': config.seed, 'next_step': 0}, train_time_s=0.0,
              wall_time_s=0.0, eval=[], upcycled_from=dense_workdir)


def write_initial_checkpoint(config: ml_collections.ConfigDict, state: nnx.State,
                             workdir: str) -> None:
  """Saves an upcycled `state` as step 0 of `workdir` (which must hold no checkpoint)."""
  mngr = checkpoint.make_manager(workdir, every=config.checkpoint_every_steps,
                                 keep=config.keep_checkpoints)
  if mngr.latest_step() is not None:
    raise ValueError(f'{workdir} already holds checkpoints; upcycle into a new workdir.')
  checkpoint.save(mngr, 0, state, initial_meta(config, config.init_from.dense_workdir), force=True)
  mngr.wait_until_finished()
  mngr.close()
