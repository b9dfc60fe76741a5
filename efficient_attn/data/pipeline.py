"""The one input pipeline: a task's random-access source -> fixed-length numpy batches (grain).

`make_batches(task, batch_size, seed=...)` returns an iterator of dicts:
  'inputs'   int32 [batch, seq_len]  token ids, 0 = padding
  'mask'     bool  [batch, seq_len]  True where 'inputs' holds a real token
  'targets'  int32 [batch]           class label; for language modelling int32
                                     [batch, seq_len], the next byte of each input
  'weights'  float32 [batch]         1 for real examples, 0 for padding examples
Pair tasks (Retrieval) have 'inputs1', 'mask1', 'inputs2', 'mask2' instead of
'inputs' and 'mask'.

The pipeline is grain's: `MapDataset.source` -> this host's shard (examples
`shard_index::shard_count`, by default jax.process_index() of jax.process_count(),
so shards are disjoint and cover all) -> `shuffle` -> `repeat` -> `map` (fixed
length, masks) -> `batch`. Each host shuffles with its own seed, drawn from
(seed, shard_index), and grain reshuffles every epoch. Batches run across epoch
boundaries.

Every host yields the same number of batches, so collectives never wait on a
host that ran out:
- with `drop_remainder` (training), every shard is cut to the smallest shard's
  length, so the last `len(source) % shard_count` stored examples are never read,
  and the last `num_epochs * (len(source) // shard_count) % batch_size` examples
  of the stream (from the last epoch) are dropped;
- without it (evaluation), the stream ends with weight-0 padding examples up to
  the whole number of batches of the largest shard: each example of the split
  comes exactly once per epoch on exactly one host.

The iterator's state is grain's, plus the arguments that fix the order; `set_state`
refuses a state saved by an iterator built with other ones. Save it with
`grain.checkpoint.CheckpointSave(iterator)` in an orbax Composite.
"""

import functools
import math

import grain
import numpy as np

from efficient_attn.data import common

_MASK_OF = {'inputs': 'mask', 'inputs1': 'mask1', 'inputs2': 'mask2'}


def _fit(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Token ids cut or padded to `seq_len`, and the mask of real tokens."""
  tokens = np.asarray(tokens)[:seq_len]
  fitted = np.zeros(seq_len, dtype=np.int32)
  fitted[:len(tokens)] = tokens
  mask = np.zeros(seq_len, dtype=bool)
  mask[:len(tokens)] = True
  return fitted, mask


def fixed_length_example(example: dict, seq_len: int, causal_lm: bool) -> dict:
  """A source example as fixed-length arrays with masks and weight 1."""
  fixed = {'weights': np.float32(1.0)}
  for key, mask_key in _MASK_OF.items():
    if key in example:
      fixed[key], fixed[mask_key] = _fit(example[key], seq_len)
  if causal_lm:
    fixed['targets'] = _fit(example['targets'], seq_len)[0]
  else:
    fixed['targets'] = np.int32(example['targets'])
  return fixed


def padding_example(task: common.Task) -> dict:
  """An all-padding example of `task`'s fixed-length shapes, with weight 0."""
  empty = {key: () for key in (('inputs1', 'inputs2') if task.pair else ('inputs',))}
  empty['targets'] = () if task.causal_lm else 0
  return {**fixed_length_example(empty, task.seq_len, task.causal_lm),
          'weights': np.float32(0.0)}


class CheckedIterator(grain.DatasetIterator):
  """A grain iterator whose state also holds what fixes its order, checked on restore."""

  def __init__(self, parent: grain.DatasetIterator, fingerprint: dict):
    super().__init__(parent)
    self.fingerprint = fingerprint

  def __next__(self) -> dict:
    return next(self._parent)

  def get_state(self) -> dict:
    return {'pipeline': dict(self.fingerprint), 'grain': self._parent.get_state()}

  def set_state(self, state: dict) -> None:
    if not isinstance(state, dict) or set(state) != {'pipeline', 'grain'}:
      raise ValueError(f'not a state of make_batches: {state!r:.200}')
    for field, value in self.fingerprint.items():
      saved = state['pipeline'].get(field)
      if saved != value:
        raise ValueError(f'the state was saved by an iterator with {field}={saved!r}; '
                         f'this one has {field}={value!r}')
    self._parent.set_state(state['grain'])

  def __str__(self) -> str:
    return f'CheckedIterator({self.fingerprint})'


def _default_shard(shard_index, shard_count) -> tuple[int, int]:
  """This host's shard: the given one, or jax.process_index() of jax.process_count()."""
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} is not in [0, {shard_count})')
  return shard_index, shard_count


def _host_seed(seed: int, shard_index: int) -> int:
  """The shuffling seed of one host, a 32-bit hash of (seed, shard_index)."""
  return int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])


def make_batches(task: common.Task, batch_size: int, *, seed: int = 0,
                 shuffle: bool | None = None, num_epochs: int | None = -1,
                 drop_remainder: bool | None = None, shard_index: int | None = None,
                 shard_count: int | None = None, num_threads: int = 2,
                 prefetch: int = 4) -> CheckedIterator:
  """Batches of a task's split for this host, as described in the module docstring.

  Args:
    task: from `get_task`.
    batch_size: examples per batch on this host.
    seed: fixes the shuffling (0 to 2**32 - 1).
    shuffle: shuffle each epoch; default True for 'train', False otherwise.
    num_epochs: passes over the data; None repeats forever; default (-1) None for
      'train' and 1 otherwise.
    drop_remainder: cut shards to equal length and drop a last partial batch;
      default True for 'train'. If False, the stream ends with weight-0 examples.
    shard_index: this host's shard; jax.process_index() when None.
    shard_count: number of shards; jax.process_count() when None.
    num_threads: threads reading batches ahead of the consumer (0: none).
    prefetch: batches read ahead.

  Returns:
    A grain iterator of batch dicts, with `get_state()` and `set_state(state)`.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if not 0 <= seed < 2**32:
    raise ValueError(f'seed must be in [0, 2**32), got {seed}')
  training = task.split == 'train'
  shuffle = training if shuffle is None else shuffle
  num_epochs = (None if training else 1) if num_epochs == -1 else num_epochs
  drop_remainder = training if drop_remainder is None else drop_remainder
  shard_index, shard_count = _default_shard(shard_index, shard_count)
  num_examples = len(task.source)
  dataset = grain.MapDataset.source(task.source)[shard_index::shard_count]
  if drop_remainder:
    dataset = dataset[:num_examples // shard_count]
  if len(dataset) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f'shard {shard_index} of {shard_count} of {task.name}/{task.split} '
                     f'({num_examples} examples) is empty')
  if shuffle:
    dataset = dataset.shuffle(seed=_host_seed(seed, shard_index))
  dataset = dataset.repeat(num_epochs)
  dataset = dataset.map(functools.partial(fixed_length_example, seq_len=task.seq_len,
                                          causal_lm=task.causal_lm))
  if not drop_remainder and num_epochs is not None:
    largest_shard = math.ceil(num_examples / shard_count)
    length = math.ceil(num_epochs * largest_shard / batch_size) * batch_size
    padding = padding_example(task)
    dataset = grain.MapDataset.concatenate(
        [dataset, grain.MapDataset.range(length - len(dataset)).map(lambda _: padding)])
  dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  fingerprint = {'task': task.name, 'split': task.split, 'num_examples': num_examples,
                 'seq_len': task.seq_len, 'seed': int(seed), 'batch_size': batch_size,
                 'shard_index': shard_index, 'shard_count': shard_count,
                 'shuffle': bool(shuffle), 'drop_remainder': bool(drop_remainder)}
  return CheckedIterator(iter(dataset.to_iter_dataset(read_options)), fingerprint)
