"""The one input pipeline: a task's random-access source -> fixed-length numpy batches (grain).

`make_batches(task, batch_size, seed=...)` returns an iterator of dicts:
  'inputs'   int32 [batch, seq_len]  token ids, 0 = padding
  'mask'     bool  [batch, seq_len]  True where 'inputs' holds a real token
  'targets'  int32 [batch]           class label; for language modelling int32
                                     [batch, seq_len], the next byte of each input
  'weights'  float32 [batch]         1 for real examples, 0 for the padding examples
                                     that fill the last evaluation batch
Pair tasks (Retrieval) have 'inputs1', 'mask1', 'inputs2', 'mask2' instead of
'inputs' and 'mask'.

Order: this host's shard (`shard_index::shard_count` of the examples, by default
jax.process_index() of jax.process_count(), so shards are disjoint and cover all)
is shuffled with a permutation fixed by `seed` and reshuffled every epoch. The
iterator's `get_state()` is a small dict; `set_state()` on a new iterator built
with the same arguments resumes with exactly the batches that would have come next.

Training (split 'train') by default repeats forever, shuffles and drops a last
partial batch. Evaluation (other splits) by default reads one epoch in order and
pads the last batch with weight-0 examples, giving every host the same number of
batches.
"""

import math
import sys

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


def padding_example(example: dict) -> dict:
  """An all-padding example shaped like the fixed-length `example`, with weight 0."""
  return {key: np.zeros_like(value) for key, value in example.items()}


def read_many(source, indices: list[int]) -> list[dict]:
  """Items `indices` of `source`, in one batched read where the source supports it."""
  if hasattr(source, '__getitems__'):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


class ShardBatches:
  """Random-access source of the batches of one shard: batch `b` holds stream positions
  `b * batch_size ...`, where epoch `e` of the stream is the shard in the order of a
  permutation drawn from (seed, e), or in stored order without shuffling.

  Positions past the shard's examples (up to `epoch_length`) are padding examples.
  """

  def __init__(self, task: common.Task, indices: np.ndarray, epoch_length: int,
               batch_size: int, seed: int, shuffle: bool, num_epochs: int | None,
               drop_remainder: bool):
    self.task = task
    self.indices = indices
    self.epoch_length = epoch_length
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.positions = None if num_epochs is None else num_epochs * epoch_length
    self.drop_remainder = drop_remainder
    self._orders = {}

  def __len__(self) -> int:
    if self.positions is None:
      return sys.maxsize
    if self.drop_remainder:
      return self.positions // self.batch_size
    return math.ceil(self.positions / self.batch_size)

  def _order(self, epoch: int) -> np.ndarray:
    """The order of the shard's positions in `epoch`."""
    if not self.shuffle:
      return np.arange(self.epoch_length)
    order = self._orders.get(epoch)
    if order is None:
      order = np.random.default_rng([self.seed, epoch]).permutation(self.epoch_length)
      # Replaced whole, so that reader threads never see a half-updated cache.
      recent = {e: o for e, o in self._orders.items() if e >= epoch - 1}
      self._orders = {**recent, epoch: order}
    return order

  def __getitem__(self, batch: int) -> dict:
    if not 0 <= batch < len(self):
      raise IndexError(batch)
    stop = (batch + 1) * self.batch_size
    if self.positions is not None:
      stop = min(stop, self.positions)
    items = [self._order(epoch)[offset] for epoch, offset in
             (divmod(position, self.epoch_length)
              for position in range(batch * self.batch_size, stop))]
    real = [int(self.indices[item]) for item in items if item < len(self.indices)]
    examples = [fixed_length_example(record, self.task.seq_len, self.task.causal_lm)
                for record in read_many(self.task.source, real)]
    examples += [padding_example(examples[0])] * (self.batch_size - len(examples))
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

  def __repr__(self) -> str:
    return (f'ShardBatches({self.task.name}/{self.task.split}, {len(self.indices)} examples, '
            f'batch {self.batch_size})')


def _default_shard(shard_index, shard_count) -> tuple[int, int]:
  """This host's shard: the given one, or jax.process_index() of jax.process_count()."""
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} is not in [0, {shard_count})')
  return shard_index, shard_count


def make_batches(task: common.Task, batch_size: int, *, seed: int = 0,
                 shuffle: bool | None = None, num_epochs: int | None = -1,
                 drop_remainder: bool | None = None, shard_index: int | None = None,
                 shard_count: int | None = None, num_threads: int = 2,
                 prefetch: int = 4) -> grain.DatasetIterator:
  """Batches of a task's split for this host, as described in the module docstring.

  Args:
    task: from `get_task`.
    batch_size: examples per batch on this host.
    seed: fixes the shuffling (0 to 2**32 - 1).
    shuffle: shuffle each epoch; default True for 'train', False otherwise.
    num_epochs: passes over the data; None repeats forever; default (-1) None for
      'train' and 1 otherwise.
    drop_remainder: drop a last partial batch; default True for 'train'. If False,
      the last batch is filled with weight-0 examples and every shard yields the
      same number of batches.
    shard_index: this host's shard; jax.process_index() when None.
    shard_count: number of shards; jax.process_count() when None.
    num_threads: threads reading batches ahead of the consumer (0: none).
    prefetch: batches read ahead.

  Returns:
    A grain iterator of batch dicts, with `get_state()` and `set_state(state)`.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  training = task.split == 'train'
  shuffle = training if shuffle is None else shuffle
  num_epochs = (None if training else 1) if num_epochs == -1 else num_epochs
  drop_remainder = training if drop_remainder is None else drop_remainder
  shard_index, shard_count = _default_shard(shard_index, shard_count)
  indices = np.arange(shard_index, len(task.source), shard_count)
  epoch_length = len(indices)
  if not drop_remainder:
    # Every shard pads up to the same whole number of batches.
    largest_shard = math.ceil(len(task.source) / shard_count)
    epoch_length = math.ceil(largest_shard / batch_size) * batch_size
  if len(indices) == 0:
    raise ValueError(f'shard {shard_index} of {shard_count} of {task.name}/{task.split} is empty')
  batches = ShardBatches(task, indices, epoch_length, batch_size, seed, shuffle, num_epochs,
                         drop_remainder)
  read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(grain.MapDataset.source(batches).to_iter_dataset(read_options))
