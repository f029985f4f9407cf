"""Hash, BASE and S-BASE routers inside MoeLayer: jit, both engines, train and eval,
outputs checked against a numpy MLP applied to the experts the paper's rule picks."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx
from moe_jax import layers
from moe_jax.routing import hashing

B, S, D = 3, 8, 16
X = np.random.default_rng(0).normal(size=(B, S, D)).astype(np.float32)
IDS = np.random.default_rng(1).integers(0, 20, size=(B, S))


def np_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_experts(layer, x):
  """[E, B, S, d]: every expert's MLP on every token (numpy, float64)."""
  p = {k: np.asarray(v, np.float64) for k, v in layer.experts.params_dict().items()}
  hid = np_gelu(np.einsum('bsd,edh->ebsh', x, p['w_in']) + p['b_in'][:, None, None, :])
  return np.einsum('ebsh,ehd->ebsd', hid, p['w_out']) + p['b_out'][:, None, None, :]


def np_hash(keys, e, seed):
  m = 0xFFFFFFFF
  h = (np.asarray(keys).astype(np.int64) & m) ^ ((seed * 0x9E3779B9) & m)
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & m
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & m
  return (h ^ (h >> 16)) % e


# One expert shape (E = 4, h = 16) everywhere: initialising a new shape costs seconds.
# multihash: 2 real experts of hidden 32, each split into 2 segments of 16.
CONFIGS = {
    'hash': ('hash', dict(kind='random', seed=3)),
    'multihash': ('hash', dict(kind='multihash', num_hashes=2, seed=5)),
    'base': ('base', {}),
    'sinkhorn_base': ('sinkhorn_base', {}),
}
E, H = 4, 16


@nnx.jit(static_argnums=3)
def run(mods, x, ids, with_grad):
  """Outputs of every layer; with_grad: also d sum(y²) / d params of mods[1] (train, gather)."""
  if not with_grad:
    return [m(x, token_ids=ids) for m in mods], None

  def loss(m):
    y, aux = m(x, token_ids=ids)
    return jnp.sum(y ** 2), (y, aux)

  (_, out1), grads = nnx.value_and_grad(loss, has_aux=True)(mods[1])
  outs = [m(x, token_ids=ids) for m in mods[:1] + mods[2:]]
  return outs[:1] + [out1] + outs[1:], grads


@pytest.mark.parametrize('name', list(CONFIGS))
def test_router_in_moe_layer(name):
  router, kw = CONFIGS[name]
  e = E
  mods = []
  for engine in ('einsum', 'gather'):
    for train in (True, False):
      m = layers.MoeLayer(D, E, H, router=router, router_kwargs=kw, engine=engine, rngs=nnx.Rngs(0))
      if not train:
        m.eval()
      mods.append(m)
  ref = nnx.clone(mods[1])
  outs, grads = run(mods, jnp.asarray(X), jnp.asarray(IDS), router != 'hash')
  (y_tr, aux_tr), (y_ev, aux_ev), (g_tr, _), (g_ev, _) = outs
  for a, b in ((y_tr, g_tr), (y_ev, g_ev)):       # einsum and gather engines agree
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  assert aux_tr['losses'] == {} and aux_ev['losses'] == {}
  assert abs(float(aux_tr['metrics']['dropped_fraction'])) < 1e-6
  cand = np_experts(ref, X.astype(np.float64))                       # [E, B, S, d]
  y_tr, y_ev = np.asarray(y_tr, np.float64), np.asarray(y_ev, np.float64)
  tok = np.arange(S)[None, :]
  if name == 'hash':
    want = cand[np_hash(IDS, e, 3), np.arange(B)[:, None], tok]     # weight 1, ungated
    np.testing.assert_allclose(y_tr, want, atol=1e-4)
    np.testing.assert_allclose(y_ev, want, atol=1e-4)
  elif name == 'multihash':
    # Reference: each token's FFN assembled from N = 2 real experts of hidden 2·16: hidden
    # units [16i, 16i+16) (first-layer columns, second-layer rows) from expert hash_i(x).
    p = {k: np.asarray(v, np.float64) for k, v in ref.experts.params_dict().items()}
    k0, k1 = np_hash(IDS, 2, 5), 2 + np_hash(IDS, 2, 6)
    want = np.zeros((B, S, D))
    for b in range(B):
      for s in range(S):
        a = np.concatenate([p['w_in'][k0[b, s]], p['w_in'][k1[b, s]]], axis=1)      # [d, 32]
        bias = np.concatenate([p['b_in'][k0[b, s]], p['b_in'][k1[b, s]]])
        w2 = np.concatenate([p['w_out'][k0[b, s]], p['w_out'][k1[b, s]]], axis=0)   # [32, d]
        want[b, s] = np_gelu(X[b, s] @ a + bias) @ w2 + p['b_out'][k0[b, s]] + p['b_out'][k1[b, s]]
    np.testing.assert_allclose(y_tr, want, atol=1e-4)
  elif name == 'base':
    w = np.asarray(ref.router.centroids[...], np.float64)                 # [E, d]
    aff = np.einsum('bsd,ed->ebs', X, w)
    gated = cand / (1 + np.exp(-aff))[..., None]                           # σ(h·w_e) f_e(h)
    # Training: each token's output is one expert's gated output; with the batch shuffle
    # the experts are balanced over the whole batch (B·S/E each) but not per example.
    err = np.abs(gated - y_tr[None]).max(-1)                               # [E, B, S]
    chosen = err.argmin(0)
    assert err.min(0).max() < 1e-4
    assert (np.bincount(chosen.ravel(), minlength=e) == B * S // e).all()
    assert any((np.bincount(chosen[b], minlength=e) != S // e).any() for b in range(B))
    greedy = aff.argmax(0)
    np.testing.assert_allclose(y_ev, gated[greedy, np.arange(B)[:, None], tok], atol=1e-4)
    g = np.asarray(grads['router']['centroids'][...])
    assert np.isfinite(g).all() and np.abs(g).max() > 0      # centroids learn via the gate
  else:
    logits = np.einsum('bsd,de->ebs', X, np.asarray(ref.router.gate.kernel[...], np.float64))
    greedy = logits.argmax(0)
    gate = 1 / (1 + np.exp(-logits))
    want = (gate[..., None] * cand)[greedy, np.arange(B)[:, None], tok]
    np.testing.assert_allclose(y_ev, want, atol=1e-4)
    assert 'sinkhorn_iters' in aux_tr['metrics'] and np.isfinite(y_tr).all()
    g = np.asarray(grads['router']['gate']['kernel'][...])
    assert np.isfinite(g).all() and np.abs(g).max() > 0


def test_hash_router_contract(tmp_path):
  rngs = nnx.Rngs(0)
  a = layers.ROUTERS['hash'](D, 4, rngs=rngs)
  b = layers.ROUTERS['hash'](D, 4, rngs=rngs)
  assert int(a.seed[...]) != int(b.seed[...])          # seed=None: every layer hashes differently
  assert not nnx.state(a, nnx.Param) and len(nnx.state(a, layers.routers.hashing.HashState)) == 1
  layer = layers.MoeLayer(D, E, H, router='hash', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='needs token_ids'):
    layer(jnp.asarray(X))
  with pytest.raises(ValueError, match='build_balanced_table'):
    layers.ROUTERS['hash'](D, 4, rngs=rngs, kind='balanced')
  with pytest.raises(ValueError, match=r'values must lie in \[0, 4\)'):
    layers.ROUTERS['hash'](D, 4, rngs=rngs, kind='balanced', table=np.arange(10))
  with pytest.raises(ValueError, match='num_hashes'):
    layers.ROUTERS['hash'](D, 6, rngs=rngs, kind='multihash', num_hashes=4)
  # A table built from data, passed as a .npy path; the router uses it and checkpoints it.
  table = hashing.build_balanced_table([IDS], 20, 4)
  hashing.save_table(str(tmp_path / 't.npy'), table)
  r = layers.ROUTERS['hash'](D, 4, rngs=rngs, kind='balanced', table_path=str(tmp_path / 't.npy'))
  expert = nnx.jit(lambda r, x, i: r(x, token_ids=i).token_expert)(r, jnp.asarray(X), jnp.asarray(IDS))
  np.testing.assert_array_equal(np.asarray(expert[..., 0]), np.asarray(table)[IDS])
  np.testing.assert_array_equal(np.asarray(nnx.state(r)['table'][...]), np.asarray(table))
  # Position hashing needs no ids; causality follows the kind.
  assert not layers.ROUTERS['hash'](D, 4, rngs=rngs, kind='position').needs_token_ids
  for kind in hashing.HASH_KINDS:
    kw = dict(table=np.zeros(20, int)) if kind in hashing.TABLE_KINDS else {}
    r = layers.ROUTERS['hash'](D, 4, rngs=rngs, kind=kind, **kw)
    assert r.is_causal == (kind != 'next')


def test_base_and_sinkhorn_contract():
  assert not layers.ROUTERS['base'].causal and not layers.ROUTERS['sinkhorn_base'].causal
  r = layers.ROUTERS['base'](64, 8, rngs=nnx.Rngs(0))
  w = np.asarray(r.centroids[...])
  np.testing.assert_allclose(w @ w.T, 0.01 * np.eye(8), atol=1e-6)   # orthogonal, gain 0.1
  with pytest.raises(ValueError, match='not divisible by E=3'):
    layers.ROUTERS['base'](D, 3, rngs=nnx.Rngs(0))(jnp.asarray(X))
  with pytest.raises(ValueError, match='gate must be one of'):
    layers.ROUTERS['sinkhorn_base'](D, 4, rngs=nnx.Rngs(0), gate='tanh')
