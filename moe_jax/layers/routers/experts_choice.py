"""Expert choice (Zhou et al. 2022) behind a linear gate (`routing.experts_choice`);
registry name 'experts_choice'."""
from __future__ import annotations

import jax
from flax import nnx

from moe_jax import routing
from moe_jax.layers.routers.base import Router, check_k
from moe_jax.routing import CapacitySpec
from moe_jax.routing.experts_choice import experts_choice_token_eval, token_eval_k

Array = jax.Array

EVAL_RULES = ('experts_choice', 'token_top_k')


class ExpertsChoiceRouter(Router):
  """Expert choice (`routing.experts_choice`) behind a linear gate. Not causal.

  router_kwargs: the capacity keywords (capacity_factor 2.0, the paper's EC-CF2),
  `noise_std`, `init_scale`, the keywords of `routing.experts_choice`, and:
    eval_rule: how the router routes in evaluation mode: 'experts_choice' (default, the
      training rule) or 'token_top_k', the causal rule
      (`routing.experts_choice.experts_choice_token_eval`): every token takes its own
      top-`eval_k` experts by the same probabilities, nothing dropped. Training is the
      same either way.
    eval_k: experts per token under 'token_top_k' (default round(capacity_factor), >= 1).
  """
  routing_fn = staticmethod(routing.experts_choice)
  default_capacity = CapacitySpec(capacity_factor=2.0)
  causal = False

  def __init__(self, d_model: int, num_experts: int, *, rngs: nnx.Rngs, context=None,
               noise_std: float = 0.0, init_scale: float = 0.1,
               eval_rule: str = 'experts_choice', eval_k: int | None = None, **kwargs):
    if eval_rule not in EVAL_RULES:
      raise ValueError(f'eval_rule must be one of {EVAL_RULES}, got {eval_rule!r}.')
    super().__init__(d_model, num_experts, rngs=rngs, context=context, kwargs=kwargs,
                     gate_init_scale=init_scale, noise_std=noise_std)
    self.eval_rule = eval_rule
    self.eval_k = check_k(token_eval_k(self.capacity.capacity_factor) if eval_k is None
                          else eval_k, num_experts, ' (eval_k)')

  def __call__(self, x: Array, *, token_ids: Array | None = None) -> routing.Routing:
    logits = self.add_noise(self.gate(x))
    if self.deterministic and self.eval_rule == 'token_top_k':
      return experts_choice_token_eval(logits, k=self.eval_k)
    return routing.experts_choice(logits, capacity=self.slots(x.shape[1]), **self.routing_kwargs)
