"""Pure training and evaluation steps: loss, gradients (accumulated), optimizer update.

A step works on a `TrainState` and a batch dict of `make_batches`. Losses are
sums over examples divided by the global sum of weights, so the data-parallel
runs (mesh or pmap) compute the same numbers as one device with the same global
batch. Evaluation returns sums (loss, correct, weight), added up on the host.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax import struct


@struct.dataclass
class TrainState:
  """What a training step reads and writes; a pytree, checkpointed whole."""
  step: jax.Array
  params: Any
  rest: Any  # the model's other state (e.g. random-feature draws)
  opt_state: Any
  key: jax.Array  # uint32 key data, advanced by folding in the step


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  """The model's graph and the optimizer: what the pure steps close over."""
  graphdef: Any
  optimizer: optax.GradientTransformation
  causal_lm: bool
  grad_accum: int = 1
  axis_name: str | None = None  # pmap's axis; None under jit with a mesh


def example_weights(batch: dict, causal_lm: bool) -> jax.Array:
  """Float32 weight of each example (each real token for a language model); 0 for padding."""
  weights = batch['weights'].astype(jnp.float32)
  if causal_lm:
    weights = weights[:, None] * batch['mask'].astype(jnp.float32)
  return weights


def example_losses(logits: jax.Array, batch: dict, causal_lm: bool):
  """(loss, correct, weight), per example or per token, of a batch."""
  targets = batch['targets']
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return losses, correct, example_weights(batch, causal_lm)


def _global_sum(x, axis_name):
  """Sum of x over the data-parallel devices (pmap), or x itself (jit: already global)."""
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def make_train_step(fns: StepFunctions) -> Callable:
  """The pure `train_step(state, batch) -> (state, metrics)`."""

  def loss_fn(params, rest, batch, key, total_weight):
    model = nnx.merge(fns.graphdef, params, rest)
    logits = model(batch, deterministic=False, rngs=key)
    losses, correct, weights = example_losses(logits, batch, fns.causal_lm)
    loss = jnp.sum(losses * weights) / total_weight
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return loss, (jnp.sum(correct * weights), new_rest)

  def train_step(state: TrainState, batch: dict):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    if fns.axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(fns.axis_name))
    weights = example_weights(batch, fns.causal_lm)
    total_weight = jnp.maximum(_global_sum(jnp.sum(weights), fns.axis_name), 1.0)
    # Gradient accumulation: the batch as `grad_accum` micro-batches, summed by a scan.
    micro = jax.tree.map(
        lambda x: x.reshape((fns.grad_accum, x.shape[0] // fns.grad_accum) + x.shape[1:]),
        batch)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, inputs):
      grads, loss, correct, rest = carry
      index, micro_batch = inputs
      (micro_loss, (micro_correct, rest)), micro_grads = grad_fn(
          state.params, rest, micro_batch, jax.random.fold_in(key, index), total_weight)
      grads = jax.tree.map(jnp.add, grads, micro_grads)
      return (grads, loss + micro_loss, correct + micro_correct, rest), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss, correct, rest), _ = jax.lax.scan(
        accumulate, (zeros, jnp.float32(0), jnp.float32(0), state.rest),
        (jnp.arange(fns.grad_accum), micro))
    grads = _global_sum(grads, fns.axis_name)
    loss = _global_sum(loss, fns.axis_name)
    correct = _global_sum(correct, fns.axis_name)
    updates, opt_state = fns.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, rest=rest,
                              opt_state=opt_state)
    metrics = {'loss': loss, 'accuracy': correct / total_weight,
               'grad_norm': optax.tree.norm(grads)}
    return new_state, metrics

  return train_step


def make_eval_step(fns: StepFunctions) -> Callable:
  """The pure `eval_step(state, batch) -> sums` of loss, correct and weight."""

  def eval_step(state: TrainState, batch: dict):
    model = nnx.merge(fns.graphdef, state.params, state.rest)
    logits = model(batch, deterministic=True)
    losses, correct, weights = example_losses(logits, batch, fns.causal_lm)
    sums = {'loss': jnp.sum(losses * weights), 'correct': jnp.sum(correct * weights),
            'weight': jnp.sum(weights)}
    return jax.tree.map(lambda x: _global_sum(x, fns.axis_name), sums)

  return eval_step


def learning_rate_schedule(schedule: str, learning_rate: float, warmup_steps: int,
                           total_steps: int) -> optax.Schedule:
  """LRA's schedules: 'rsqrt' (constant x linear warmup x rsqrt decay), 'cosine', 'constant'.

  Args:
    schedule: 'rsqrt', 'cosine' or 'constant'.
    learning_rate: the constant factor.
    warmup_steps: steps of linear warmup from 0.
    total_steps: training steps (the cosine's length).

  Returns:
    step -> learning rate.
  """
  warmup = max(warmup_steps, 1)

  def rsqrt(step):
    step = jnp.asarray(step, jnp.float32)
    return (learning_rate * jnp.minimum(1.0, step / warmup)
            / jnp.sqrt(jnp.maximum(step, warmup)))

  def cosine(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
    return (learning_rate * jnp.minimum(1.0, step / warmup)
            * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))

  def constant(step):
    return learning_rate * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup)

  return {'rsqrt': rsqrt, 'cosine': cosine, 'constant': constant}[schedule]


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW as LRA's code (b1 0.9, b2 0.98, eps 1e-9, decay scaled by the rate), clipped."""
  schedule = learning_rate_schedule(train_config.schedule, train_config.learning_rate,
                                    train_config.warmup_steps, train_config.steps)
  adamw = optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-9,
                      weight_decay=train_config.weight_decay)
  if train_config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train_config.grad_clip), adamw)
  return adamw
