"""The grain pipeline: order, epochs, host shards, padding masks, exact resume."""

import numpy as np
import pytest

from efficient_attn.data import Task, make_batches
from efficient_attn.data.common import ArraySource

NUM = 30


def toy_task(split: str = 'train', num: int = NUM) -> Task:
  """Examples i of length i % 5 + 1 holding ids 1.., with target i."""
  inputs = [np.arange(1, i % 5 + 2, dtype=np.int32) for i in range(num)]
  return Task(name='toy', split=split, source=ArraySource(inputs, np.arange(num)),
              vocab_size=8, num_classes=num, seq_len=4)


def targets(iterator, count: int) -> list[list[int]]:
  return [next(iterator)['targets'].tolist() for _ in range(count)]


def single_host(task, batch_size, **kwargs):
  return make_batches(task, batch_size, shard_index=0, shard_count=1, **kwargs)


def test_order_is_fixed_by_the_seed():
  first = targets(single_host(toy_task(), 5, seed=3), 6)
  assert first == targets(single_host(toy_task(), 5, seed=3), 6)
  assert first != targets(single_host(toy_task(), 5, seed=4), 6)
  assert first != [list(range(i, i + 5)) for i in range(0, 30, 5)]


def test_each_epoch_is_a_new_permutation():
  flat = sum(targets(single_host(toy_task(), 5, seed=0), 12), [])
  epochs = [flat[:NUM], flat[NUM:]]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(NUM))
  assert epochs[0] != epochs[1]


def test_host_shards_are_disjoint_and_cover_everything():
  seen = []
  counts = set()
  for host in range(4):
    batches = list(make_batches(toy_task('valid'), 4, shard_index=host, shard_count=4))
    counts.add(len(batches))
    for batch in batches:
      seen += batch['targets'][batch['weights'] > 0].tolist()
  assert sorted(seen) == list(range(NUM))
  assert counts == {2}  # equal batch counts on every host, padded with weight 0
  train = [set(sum(targets(make_batches(toy_task(), 7, seed=1, shard_index=h, shard_count=2), 2),
                   [])) for h in range(2)]
  assert not train[0] & train[1]


def test_fixed_length_with_padding_masks():
  batch = next(single_host(toy_task('test'), 6))
  assert batch['inputs'].dtype == np.int32 and batch['mask'].dtype == bool
  assert batch['inputs'].shape == batch['mask'].shape == (6, 4)
  lengths = np.minimum(np.arange(6) % 5 + 1, 4)
  np.testing.assert_array_equal(batch['mask'].sum(1), lengths)
  np.testing.assert_array_equal(batch['mask'], batch['inputs'] != 0)
  assert batch['inputs'][4].tolist() == [1, 2, 3, 4]  # cut to seq_len
  np.testing.assert_array_equal(batch['weights'], np.ones(6, np.float32))


def test_last_evaluation_batch_is_padded():
  batches = list(single_host(toy_task('valid'), 8))
  assert len(batches) == 4
  last = batches[-1]
  np.testing.assert_array_equal(last['weights'], [1] * 6 + [0] * 2)
  assert not last['mask'][6:].any()


@pytest.mark.parametrize('consumed', [3, 7])
def test_saved_state_resumes_with_the_same_batches(consumed):
  iterator = single_host(toy_task(), 4, seed=9)
  for _ in range(consumed):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(10)]  # crosses an epoch boundary
  resumed = single_host(toy_task(), 4, seed=9)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_bad_shard_is_rejected():
  with pytest.raises(ValueError, match='shard_index 2'):
    make_batches(toy_task(), 4, shard_index=2, shard_count=2)
