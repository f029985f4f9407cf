"""The one error type for bad configuration, raised before any work is done.

    raise ConfigError('must be >= 1, got 0.', field='config.model.moe.num_experts')
    # -> ConfigError: config.model.moe.num_experts: must be >= 1, got 0.

`field` is the dotted path of the offending value: inside the experiment config it
starts with 'config.'; for a layer built by hand it is the name of its argument. Imports nothing: every layer of
the package may raise it.
"""
from __future__ import annotations


class ConfigError(ValueError):
  """A configuration value that cannot work; the message says what to change.

  Attributes:
    field: dotted path of the value ('config.model.moe.router_kwargs.k'), or None.
    detail: the message without the field prefix.
  """

  def __init__(self, detail: str, *, field: str | None = None):
    self.field, self.detail = field, detail
    super().__init__(f'{field}: {detail}' if field else detail)

  def under(self, prefix: str) -> ConfigError:
    """The same error with its field placed under `prefix` ('config.model.moe' + 'k')."""
    field = f'{prefix}.{self.field}' if self.field else prefix
    return ConfigError(self.detail, field=field)


def check_positive(**sizes) -> None:
  """Raises ConfigError (field = the name) for the first size that is not a positive
  integer; None means 'not set'. Models call it before dividing by any of them."""
  for name, v in sizes.items():
    if v is None:
      continue
    if isinstance(v, bool) or not hasattr(v, '__index__') or v < 1:
      raise ConfigError(f'must be a positive integer, got {v!r}.', field=name)
