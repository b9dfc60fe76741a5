"""Checkpoints of a run (orbax): train state and data-iterator state in one step, atomic.

The manager keeps the last `keep` checkpoints and the one with the best
validation score. A checkpoint that cannot be restored (damaged, truncated, or
from another model) raises CheckpointError naming its folder and what is wrong.
"""

import pathlib

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


class CheckpointError(RuntimeError):
  """A checkpoint in the workdir cannot be restored; the message names it."""


def _is_key(x) -> bool:
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(tree):
  """`tree` with typed random keys as their uint32 key data (what orbax stores)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_saveable(saved, like):
  """Typed random keys back where `like` holds them."""
  return jax.tree.map(lambda s, x: jax.random.wrap_key_data(s) if _is_key(x) else s,
                      saved, like)


def _score(metrics: dict) -> float:
  return metrics['score']


def make_manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  """The manager of `directory`: the last `keep` checkpoints and the best one.

  `manager.best_step()` is the kept step with the highest score (None if none has one).
  """
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(get_metric_fn=_score, n=1,
                                keep_checkpoints_without_metrics=False)])
  # best_fn makes orbax store each step's metrics; the policy decides what is kept.
  options = ocp.CheckpointManagerOptions(create=True, best_fn=_score, best_mode='max',
                                         preservation_policy=policy)
  handlers = {'state': ocp.StandardCheckpointHandler(),
              'data': grain.checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                               item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state, iterator,
         score: float | None = None) -> None:
  """Saves the train state and the data iterator at `step` (asynchronously)."""
  args = ocp.args.Composite(state=ocp.args.StandardSave(to_saveable(state)),
                            data=grain.checkpoint.CheckpointSave(iterator))
  manager.save(step, args=args, metrics=None if score is None else {'score': float(score)},
               force=True)


def _leaves_by_name(tree) -> dict:
  """{'params/encoder/...': leaf}: the leaves of a pytree by a path spelled the same for
  dataclasses, dicts and lists (orbax's metadata holds dicts where the state has objects)."""
  def part(key):
    for attribute in ('name', 'key', 'idx'):
      if hasattr(key, attribute):
        return str(getattr(key, attribute))
    return str(key)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(part(k) for k in path): leaf for path, leaf in leaves}


def _check_compatible(manager, step: int, abstract_state) -> None:
  """Raises CheckpointError when the stored shapes are not those of `abstract_state`."""
  folder = pathlib.Path(manager.directory) / str(step)
  try:
    stored = manager.item_metadata(step)['state']
  except Exception as error:  # orbax raises several types for unreadable metadata
    raise CheckpointError(f'checkpoint {folder} cannot be read: {error}') from error
  if stored is None:
    raise CheckpointError(f'checkpoint {folder} holds no train state')
  expected = _leaves_by_name(abstract_state)
  try:
    stored_leaves = _leaves_by_name(stored)
  except Exception as error:
    raise CheckpointError(f'checkpoint {folder} has unreadable metadata: {error}') from error
  for name, leaf in expected.items():
    found = stored_leaves.get(name)
    if found is None:
      raise CheckpointError(f'checkpoint {folder} has no {name}: it is from another model')
    if tuple(found.shape) != tuple(leaf.shape):
      raise CheckpointError(
          f'checkpoint {folder} holds {name} of shape {tuple(found.shape)}, this model has '
          f'{tuple(leaf.shape)}: it is from another model size; use a new workdir')
  if len(stored_leaves) != len(expected):
    raise CheckpointError(
        f'checkpoint {folder} holds {len(stored_leaves)} arrays, this model has '
        f'{len(expected)}: it is from another model; use a new workdir')


def restore(manager: ocp.CheckpointManager, step: int, state, iterator=None):
  """The train state saved at `step` (shaped and placed as `state`); restores `iterator` too.

  Raises:
    CheckpointError: naming the checkpoint folder and what is wrong.
  """
  saveable = to_saveable(state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, saveable)
  _check_compatible(manager, step, abstract)
  items = {'state': ocp.args.StandardRestore(abstract)}
  if iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(iterator)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except ValueError as error:
    raise CheckpointError(
        f'checkpoint {pathlib.Path(manager.directory) / str(step)} does not fit this run: '
        f'{error}') from error
  except Exception as error:  # damaged files: orbax and tensorstore raise several types
    raise CheckpointError(
        f'checkpoint {pathlib.Path(manager.directory) / str(step)} is damaged or truncated '
        f'({type(error).__name__}: {error}); delete it to resume from an earlier one') from error
  return from_saveable(restored['state'], state)

