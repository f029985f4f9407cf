"""How well EC-CAP keeps its per-token cap after rounding, against plain expert choice.

    python scripts/ec_cap_rounding.py --out /tmp/ec_cap_rounding.json

For random router logits (std 1 and 2), groups of S = 64 tokens, E = 8 experts,
capacity factor 2 (C = 16), it reports the fraction of tokens that more than b experts
picked, for plain EC and for EC-CAP at several (temperature, sweeps) settings, and the
LP objective gap (scipy linprog) of the rounded EC-CAP assignment. Writes JSON.
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linprog

from moe_jax.routing import experts_choice
from moe_jax.routing.experts_choice_capped import experts_choice_capped


def experts_per_token(slot_token, num_tokens):
  counts = np.zeros((slot_token.shape[0], num_tokens + 1), int)
  for g in range(slot_token.shape[0]):
    np.add.at(counts[g], slot_token[g].reshape(-1), 1)
  return counts[:, :num_tokens]


def lp_optimum(scores, capacity, cap):
  s, e = scores.shape
  rows = np.kron(np.eye(e), np.ones((1, s)))
  cols = np.kron(np.ones((1, e)), np.eye(s))
  res = linprog(-scores.T.reshape(-1), A_ub=cols, b_ub=np.full(s, cap), A_eq=rows,
                b_eq=np.full(e, capacity), bounds=(0, 1), method='highs')
  return -res.fun


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='ec_cap_rounding.json')
  parser.add_argument('--groups', type=int, default=8)
  args = parser.parse_args()
  g, s, e, cf = args.groups, 64, 8, 2.0
  capacity = int(s * cf / e)
  settings = [(0.01, 0.01, 100), (0.003, 0.3, 50), (0.003, 0.3, 100), (0.003, 0.3, 300)]
  results = []
  for std in (1.0, 2.0):
    logits = jnp.array(np.random.default_rng(0).normal(size=(g, s, e)) * std, jnp.float32)
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    plain = experts_per_token(np.asarray(experts_choice(logits, capacity_factor=cf).slot_token), s)
    for cap in (2, 3):
      opts = [lp_optimum(probs[i], capacity, cap) for i in range(g)]
      row = dict(logit_std=std, max_experts_per_token=cap,
                 plain_ec_over_cap=float((plain > cap).mean()), ec_cap=[])
      for temp, start, iters in settings:
        r = experts_choice_capped(logits, capacity_factor=cf, max_experts_per_token=cap,
                                  temperature=temp, start_temperature=start, num_iters=iters)
        slots = np.asarray(r.slot_token)
        value = [probs[i][slots[i], np.arange(e)[:, None]].sum() for i in range(g)]
        row['ec_cap'].append(dict(
            temperature=temp, start_temperature=start, num_iters=iters,
            over_cap=float((experts_per_token(slots, s) > cap).mean()),
            lp_gap_mean=float(np.mean(np.array(opts) - np.array(value)))))
      results.append(row)
  with open(args.out, 'w') as f:
    json.dump(dict(groups=g, tokens=s, experts=e, capacity_factor=cf, results=results), f, indent=1)
  print(json.dumps(results, indent=1))


if __name__ == '__main__':
  main()
