"""Evaluation metrics shared by training and the experiments."""

import math

import jax.numpy as jnp
import optax


def bits_per_byte(total_nll_nats: float, num_bytes: int) -> float:
  """Bits per byte from a negative log-likelihood in nats summed over `num_bytes` bytes."""
  return float(total_nll_nats) / (num_bytes * math.log(2))


def next_byte_nll(logits: jnp.ndarray, targets: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
  """Negative log-likelihood in nats of `targets` under `logits` `[..., vocab]`, summed where `mask`."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(jnp.where(mask, nll, 0.0))


def bits_per_byte_from_logits(logits, targets, mask) -> float:
  """Bits per byte of next-byte `logits` `[..., vocab]` at `targets` `[...]` where `mask` holds."""
  mask = jnp.asarray(mask, dtype=bool)
  return bits_per_byte(next_byte_nll(jnp.asarray(logits), jnp.asarray(targets), mask),
                       int(mask.sum()))
