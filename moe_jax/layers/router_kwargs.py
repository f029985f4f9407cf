"""Checks a router's pass-through keywords against its routing function at construction,
so a typo in `router_kwargs` fails when the model is built, not at the first step."""
from __future__ import annotations

import inspect


def check_routing_kwargs(fn, kwargs: dict, router: str, reserved: tuple[str, ...] = ()) -> dict:
  """Returns `kwargs` if every key is a keyword of `fn` not set by the router itself."""
  params = inspect.signature(fn).parameters
  allowed = sorted(n for n, p in params.items()
                   if p.kind == inspect.Parameter.KEYWORD_ONLY and n not in reserved)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(f'router {router!r} got unknown router_kwargs {unknown}; '
                     f'its options are the constructor arguments and {allowed}.')
  return dict(kwargs)
