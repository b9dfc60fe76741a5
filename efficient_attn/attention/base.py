"""The contract every attention mechanism shares: shapes, masks, errors, registry.

Layout follows `jax.nn.dot_product_attention`: q is `[batch, q_len, heads, head_dim]`,
k and v are `[batch, kv_len, heads, head_dim]` (v may have its own last dimension).
`mask` is `None` or bool `[batch, kv_len]`, True marking a real key. A query that
sees no key returns zeros.
"""

import inspect
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Added to logits of hidden keys. Finite, so that exp() of a fully hidden row is
# not NaN; rows with no visible key are zeroed explicitly afterwards.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

# Streams of an `nnx.Rngs` that random features and rotations are drawn from, in
# order of preference ('params' last, so that modules also build under
# `nnx.bridge.to_linen`, whose init provides only 'params').
RANDOM_STREAMS = ('attention', 'default', 'params')

_REGISTRY: dict[str, type['Attention']] = {}


class RandomState(nnx.Variable):
  """Non-trainable random state of a mechanism: uint32 key data, never a typed key."""


class Attention(nnx.Module):
  """Base class of every mechanism.

  Subclasses implement `__call__(q, k, v, mask=None, causal=False, *,
  deterministic=None, rngs=None)`; mechanisms without random parts accept and
  ignore the last two.
  """

  # Options that `make_attention` accepts; filled in by `register_attention`.
  options: tuple[str, ...] = ()
  # Whether `__call__` reads `k`; False where keys are derived from the queries
  # (shared-QK LSH), so that layers need no key projection.
  uses_keys: bool = True
  # Whether `causal=True` is possible; where not, calls with it raise ValueError.
  supports_causal: bool = True
  # Whether `__call__` takes `global_mask` (bool `[batch, len]`): tokens that see
  # every key and that every query sees (Longformer).
  global_tokens: bool = False


class RandomAttention(Attention):
  """An attention with random parts (rotations, features): the redraw contract.

  A call with `deterministic=True` (or after `.eval()`) uses a key drawn once at
  construction and stored as uint32 `RandomState`; a call with `rngs` (a key or
  an `nnx.Rngs`) draws from it without touching module state, so it works inside
  plain `jax.jit` / `jax.grad` / `jax.vmap`; otherwise the module's own stream
  is advanced, which needs the `nnx` transforms.
  """

  def __init__(self, rngs: nnx.Rngs):
    self.deterministic = False
    self.rngs = random_stream(rngs)
    self.fixed_key = RandomState(jax.random.key_data(self.rngs()))

  def call_key(self, deterministic: bool | None, rngs) -> jax.Array:
    """The key of this call: fixed when deterministic, else from `rngs` or the module's stream."""
    if self.deterministic if deterministic is None else deterministic:
      return jax.random.wrap_key_data(self.fixed_key[...])
    if rngs is not None:
      return as_key(rngs)
    return self.rngs()


def as_key(rngs, streams: tuple[str, ...] = RANDOM_STREAMS) -> jax.Array:
  """A typed key from a call's `rngs`: a typed key, uint32 key data, an RngStream or nnx.Rngs.

  An `nnx.Rngs` is drawn from its first stream in `streams` (which advances it).
  """
  if isinstance(rngs, nnx.Rngs):
    return random_stream(rngs, streams, fork=False)()
  if isinstance(rngs, nnx.RngStream):
    return rngs()
  if hasattr(rngs, 'dtype'):
    if jax.dtypes.issubdtype(rngs.dtype, jax.dtypes.prng_key):
      return rngs
    if rngs.dtype == jnp.uint32:
      return jax.random.wrap_key_data(rngs)
  raise ValueError(
      f'rngs must be None, a jax random key (typed or uint32 key data), an nnx.RngStream '
      f'or an nnx.Rngs, got {getattr(rngs, "dtype", type(rngs).__name__)}')


def register_attention(name: str) -> Callable[[type[Attention]], type[Attention]]:
  """Class decorator that makes an `Attention` subclass available by `name`."""

  def register(cls):
    if name in _REGISTRY:
      raise ValueError(f'attention {name!r} is already registered by {_REGISTRY[name]}')
    params = inspect.signature(cls.__init__).parameters
    cls.options = tuple(p for p in params if p not in ('self', 'rngs'))
    cls.needs_rngs = params['rngs'].default is inspect.Parameter.empty
    cls.name = name
    _REGISTRY[name] = cls
    return cls

  return register


def available_attentions() -> tuple[str, ...]:
  """Names of the registered attention mechanisms, in registration order."""
  return tuple(_REGISTRY)


def attention_class(name: str) -> type[Attention]:
  """The class registered under `name`; ValueError listing valid names otherwise."""
  if name not in _REGISTRY:
    raise ValueError(
        f'unknown attention {name!r}; available: {", ".join(available_attentions())}')
  return _REGISTRY[name]


def make_attention(name: str, *, rngs: nnx.Rngs | None = None, **options) -> Attention:
  """Builds the attention mechanism `name` with its options.

  Args:
    name: one of `available_attentions()`.
    rngs: random streams for parameters and random parts; required by every
      mechanism that has either (there is no default seed), None accepted by
      the others.
    **options: mechanism options (e.g. `backend` for 'full', `num_features` for
      'performer').

  Returns:
    An `Attention` module, called as `attn(q, k, v, mask=None, causal=False)`.
  """
  cls = attention_class(name)
  unknown = sorted(set(options) - set(cls.options))
  if unknown:
    raise ValueError(
        f'unknown option(s) {unknown} for attention {name!r}; '
        f'valid options: {", ".join(cls.options) or "none"}')
  if rngs is None and cls.needs_rngs:
    raise ValueError(
        f'attention {name!r} has parameters or random parts and needs rngs, e.g. '
        f'make_attention({name!r}, rngs=nnx.Rngs(seed)); there is no default seed')
  return cls(**options, rngs=rngs)


def random_stream(rngs: nnx.Rngs, streams: tuple[str, ...] = RANDOM_STREAMS,
                  fork: bool = True) -> nnx.RngStream:
  """The first of `streams` that `rngs` has (a private fork of it unless `fork=False`)."""
  for name in streams:
    if name in rngs:
      return rngs[name].fork() if fork else rngs[name]
  raise ValueError(f'rngs needs one of the streams {", ".join(map(repr, streams))}, got {rngs}')


def check_choice(argument: str, value, allowed) -> None:
  """Raises ValueError unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ValueError(f'{argument}={value!r} is not supported; allowed: {", ".join(map(repr, allowed))}')


def check_positive_int(argument: str, value) -> None:
  """Raises ValueError unless `value` is a positive int."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{argument} must be a positive int, got {value!r}')


def check_non_negative_int(argument: str, value) -> None:
  """Raises ValueError unless `value` is an int >= 0."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f'{argument} must be a non-negative int, got {value!r}')


def check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                 self_attention: bool = False) -> None:
  """Validates q, k, v and mask against the shared layout; ValueError otherwise.

  Args:
    q: queries `[batch, q_len, heads, head_dim]`.
    k: keys `[batch, kv_len, heads, head_dim]`.
    v: values `[batch, kv_len, heads, value_dim]`.
    mask: None or bool `[batch, kv_len]`.
    self_attention: also require q_len == kv_len (mechanisms that tie queries to
      key positions, e.g. causal or windowed attention).
  """
  for name, x in (('q', q), ('k', k), ('v', v)):
    if not hasattr(x, 'shape') or x.ndim != 4:
      shape = getattr(x, 'shape', type(x).__name__)
      raise ValueError(
          f'{name} must have rank 4 [batch, length, heads, head_dim], got shape {shape}')
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f'{name} must be a floating dtype, got {x.dtype}')
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f'q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}')
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(
        f'k and v must agree in [batch, kv_len, heads], got k {k.shape} and v {v.shape}')
  if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
    raise ValueError(
        f'q and k must agree in batch, heads and head_dim, got q {q.shape} and k {k.shape}')
  if self_attention and q.shape[1] != k.shape[1]:
    raise ValueError(
        f'this attention needs q_len == kv_len, got q {q.shape} and k {k.shape}')
  if mask is not None:
    if not hasattr(mask, 'shape') or mask.dtype != jnp.bool_:
      raise ValueError(
          f'mask must be a bool array [batch, kv_len], got {getattr(mask, "dtype", type(mask).__name__)}')
    if mask.shape != (k.shape[0], k.shape[1]):
      raise ValueError(
          f'mask must have shape [batch, kv_len] = {(k.shape[0], k.shape[1])}, got {mask.shape}')


def default_scale(head_dim: int) -> float:
  """The softmax temperature 1/sqrt(head_dim)."""
  return 1.0 / math.sqrt(head_dim)


def round_up(x: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= x."""
  return -(-x // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
  """Pads `axis` of `x` at the end up to a multiple of `multiple`."""
  length = x.shape[axis]
  extra = -length % multiple
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def key_mask_or_ones(mask: jax.Array | None, batch: int, kv_len: int) -> jax.Array:
  """The bool key mask `[batch, kv_len]`, all True when `mask` is None."""
  if mask is None:
    return jnp.ones((batch, kv_len), dtype=bool)
  return mask


def to_blocks(x: jax.Array, block: int) -> jax.Array:
  """`[batch, len, heads, dim]` -> `[len // block, batch, heads, block, dim]`."""
  b, n, h, d = x.shape
  return x.reshape(b, n // block, block, h, d).transpose(1, 0, 3, 2, 4)


def from_blocks(x: jax.Array) -> jax.Array:
  """Inverse of `to_blocks`."""
  nb, b, h, block, d = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(b, nb * block, h, d)
