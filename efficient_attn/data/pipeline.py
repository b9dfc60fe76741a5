"""The one input pipeline: a task's random-access source -> fixed-length numpy batches (grain).

`make_batches(task, batch_size, seed=...)` returns an iterator of dicts:
  'inputs'   int32 [batch, seq_len]  token ids, 0 = padding
  'mask'     bool  [batch, seq_len]  True where 'inputs' holds a real token
  'targets'  int32 [batch]           class label; for language modelling int32
                                     [batch, seq_len], the next byte of each input
  'weights'  float32 [batch]         1 for real examples, 0 for padding examples
Pair tasks (Retrieval) have 'inputs1', 'mask1', 'inputs2', 'mask2' instead of
'inputs' and 'mask'.

The order is grain's, on example indices: this host's shard (`MapDataset.range`
of the indices `shard_index::shard_count`, by default jax.process_index() of
jax.process_count(), so shards are disjoint and cover all) -> `shuffle` -> `repeat`
-> `batch` -> `map` (read the batch's examples, fit them to seq_len with masks).
Batching indices before reading keeps one batched read per batch
(`source.__getitems__`, as TFDS data sources have): grain 0.2.18 reads items one by
one through `map` and `batch`, 4-6x slower for array_record files. Each host
shuffles with its own seed, drawn from (seed, shard_index), and grain reshuffles
every epoch. Batches run across epoch boundaries.

Every host yields the same number of batches, so collectives never wait on a
host that ran out:
- with `drop_remainder` (training), every shard is cut to the smallest shard's
  length, so the last `len(source) % shard_count` stored examples are never read,
  and the stream's last `num_epochs * (len(source) // shard_count) % batch_size`
  examples (fewer than a batch) are dropped;
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
_PADDING = -1  # the index of a padding example


def _fit(sequences: list, rows: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Sequences cut or padded to `seq_len` as `rows` rows (extra rows: padding), and masks."""
  fitted = np.zeros((rows, seq_len), dtype=np.int32)
  lengths = np.zeros(rows, dtype=np.int64)
  for row, tokens in enumerate(sequences):
    tokens = tokens[:seq_len]
    fitted[row, :len(tokens)] = tokens
    lengths[row] = len(tokens)
  return fitted, np.arange(seq_len) < lengths[:, None]


def read_many(source, indices: list[int]) -> list:
  """Items `indices` of `source`, in one batched read where the source supports it."""
  if hasattr(source, '__getitems__'):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


def read_batch(task: common.Task, indices: np.ndarray) -> dict:
  """The fixed-length batch of examples `indices` of `task.source`.

  Index _PADDING, only after the real ones, stands for a padding example: padding
  tokens, target 0, weight 0, in `task`'s shapes (so a batch may be all padding).
  """
  real = [int(i) for i in indices if i != _PADDING]
  examples = read_many(task.source, real)
  rows = len(indices)
  batch = {'weights': (np.arange(rows) < len(real)).astype(np.float32)}
  for key in ('inputs1', 'inputs2') if task.pair else ('inputs',):
    batch[key], batch[_MASK_OF[key]] = _fit([e[key] for e in examples], rows, task.seq_len)
  if task.causal_lm:
    batch['targets'] = _fit([e['targets'] for e in examples], rows, task.seq_len)[0]
  else:
    batch['targets'] = np.zeros(rows, dtype=np.int32)
    batch['targets'][:len(real)] = [e['targets'] for e in examples]
  return batch


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
  # With drop_remainder, every shard has the smallest shard's length.
  stop = shard_count * (num_examples // shard_count) if drop_remainder else num_examples
  indices = grain.MapDataset.range(shard_index, stop, shard_count)
  if len(indices) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f'shard {shard_index} of {shard_count} of {task.name}/{task.split} '
                     f'({num_examples} examples) is empty')
  if shuffle:
    indices = indices.shuffle(seed=_host_seed(seed, shard_index))
  indices = indices.repeat(num_epochs)
  if not drop_remainder and num_epochs is not None:
    largest_shard = math.ceil(num_examples / shard_count)
    length = math.ceil(num_epochs * largest_shard / batch_size) * batch_size
    padding = grain.MapDataset.source([_PADDING] * (length - len(indices)))
    indices = grain.MapDataset.concatenate([indices, padding])
  batches = indices.batch(batch_size, drop_remainder=drop_remainder).map(
      functools.partial(read_batch, task))
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  fingerprint = {'task': task.name, 'split': task.split, 'num_examples': num_examples,
                 'seq_len': task.seq_len, 'seed': int(seed), 'batch_size': batch_size,
                 'shard_index': shard_index, 'shard_count': shard_count,
                 'shuffle': bool(shuffle), 'drop_remainder': bool(drop_remainder)}
  return CheckedIterator(iter(batches.to_iter_dataset(read_options)), fingerprint)
