"""The grain pipeline: order, epochs, host shards, padding masks, exact resume."""

import collections
import dataclasses
import functools

import grain
import numpy as np
import pytest

from efficient_attn.data import Task, make_batches
from efficient_attn.data.common import array_source

NUM = 30


def toy_task(split: str = 'train', num: int = NUM) -> Task:
  """Examples i of length i % 5 + 1 holding ids 1.., with target i."""
  inputs = [np.arange(1, i % 5 + 2, dtype=np.int32) for i in range(num)]
  return Task(name='toy', split=split, source=array_source(inputs, np.arange(num)),
              vocab_size=8, num_classes=num, seq_len=4)


def targets(iterator, count: int) -> list[list[int]]:
  return [next(iterator)['targets'].tolist() for _ in range(count)]


def single_host(task, batch_size, **kwargs):
  return make_batches(task, batch_size, shard_index=0, shard_count=1, **kwargs)


def all_hosts(task, batch_size, hosts, **kwargs) -> list[list[dict]]:
  """Every batch of every host, for a finite stream."""
  return [list(make_batches(task, batch_size, shard_index=h, shard_count=hosts, **kwargs))
          for h in range(hosts)]


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


@pytest.mark.parametrize('num', [9, 13, 30])
@pytest.mark.parametrize('hosts', [1, 2, 3, 4])
@pytest.mark.parametrize('batch_size', [4, 5])
def test_evaluation_yields_every_example_once_and_equal_batch_counts(num, hosts, batch_size):
  batches = all_hosts(toy_task('valid', num), batch_size, hosts)
  # 9 examples, 2 hosts, batch 4: host 1's third batch is all padding.
  assert len({len(host) for host in batches}) == 1
  seen = [t for host in batches for b in host for t in b['targets'][b['weights'] > 0].tolist()]
  assert sorted(seen) == list(range(num))
  for batch in (b for host in batches for b in host):
    padding = batch['weights'] == 0
    assert not batch['mask'][padding].any() and not batch['inputs'][padding].any()


@pytest.mark.parametrize('num', [9, 13, 30])
@pytest.mark.parametrize('hosts', [1, 2, 3, 4])
@pytest.mark.parametrize('num_epochs', [1, 3])
def test_finite_training_gives_equal_batch_counts_and_drops_only_the_remainders(
    num, hosts, num_epochs):
  batch_size = 2
  # Unshuffled: the counts do not depend on the order, and grain's shuffle is slow on
  # tiny shards.
  batches = all_hosts(toy_task('train', num), batch_size, hosts, num_epochs=num_epochs,
                      shuffle=False)
  shard = num // hosts  # every shard cut to the smallest one's length
  per_host = num_epochs * shard // batch_size
  assert [len(host) for host in batches] == [per_host] * hosts
  counts = collections.Counter(
      t for host in batches for b in host for t in b['targets'].tolist())
  assert all(b['weights'].all() for host in batches for b in host)
  # Never read: the last num % hosts stored examples. Dropped from the stream's
  # end: fewer than a batch per host, so each other example comes in every epoch
  # but perhaps the last.
  assert all(counts[i] == 0 for i in range(hosts * shard, num))
  assert all(num_epochs - 1 <= counts[i] <= num_epochs for i in range(hosts * shard))
  missing = hosts * shard * num_epochs - sum(counts.values())
  assert missing == hosts * (num_epochs * shard % batch_size)


def test_hosts_draw_different_orders_of_their_shards():
  hosts = 3
  first = [targets(make_batches(toy_task(), 7, seed=1, shard_index=h, shard_count=hosts), 1)[0]
           for h in range(hosts)]
  # Position in the host's shard of each example of its first batch.
  positions = [[t // hosts for t in host] for host in first]
  assert len({tuple(p) for p in positions}) == hosts
  assert not set(first[0]) & set(first[1])


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


@pytest.mark.parametrize('pair, causal_lm', [(True, False), (False, True)])
def test_an_all_padding_batch_has_the_shapes_of_the_task(pair, causal_lm):
  keys = ('inputs1', 'inputs2') if pair else ('inputs',)
  source = [{**{key: np.arange(1, i + 2) for key in keys},
             'targets': np.arange(2, i + 3) if causal_lm else i} for i in range(5)]
  task = dataclasses.replace(toy_task('valid'), source=source, pair=pair, causal_lm=causal_lm)
  # 5 examples on 4 hosts, batch 1: host 3 has one example, then a batch of padding only.
  real, padding = make_batches(task, 1, shard_index=3, shard_count=4)
  masks = ('mask1', 'mask2') if pair else ('mask',)
  assert sorted(real) == sorted(('targets', 'weights') + keys + masks)
  assert real['weights'].tolist() == [1] and padding['weights'].tolist() == [0]
  for key, value in real.items():
    assert (padding[key].shape, padding[key].dtype) == (value.shape, value.dtype), key
    assert not padding[key].any(), key
  assert real['targets'].shape == ((1, 4) if causal_lm else (1,))


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


def test_saved_state_resumes_an_evaluation_into_its_padding():
  evaluation = functools.partial(make_batches, toy_task('valid', 9), 4, shard_index=1,
                                 shard_count=2)
  iterator = evaluation()
  next(iterator)
  state = iterator.get_state()
  expected = [b['weights'].tolist() for b in iterator]
  resumed = evaluation()
  resumed.set_state(state)
  assert [b['weights'].tolist() for b in resumed] == expected == [[0, 0, 0, 0]]


@pytest.mark.parametrize('field, changes', [
    ('seed', {'seed': 2}),
    ('batch_size', {'batch_size': 5}),
    ('shard_index', {'shard_index': 1}),
    ('shard_count', {'shard_count': 3}),
    ('task', {'task': dataclasses.replace(toy_task(), name='other')}),
    ('split', {'task': toy_task('valid'), 'shuffle': True, 'drop_remainder': True}),
    ('num_examples', {'task': toy_task(num=NUM - 1)}),
    ('seq_len', {'task': dataclasses.replace(toy_task(), seq_len=5)}),
])
def test_set_state_refuses_a_state_of_another_iterator(field, changes):
  arguments = {'task': toy_task(), 'batch_size': 4, 'seed': 1, 'shard_index': 0,
               'shard_count': 2}
  saved = make_batches(**arguments)
  next(saved)
  other = make_batches(**{**arguments, **changes})
  with pytest.raises(ValueError) as error:
    other.set_state(saved.get_state())
  message = str(error.value)
  assert message.count(f'{field}=') == 2, message
  for iterator in (saved, other):
    assert repr(iterator.get_state()['pipeline'][field]) in message


def test_state_round_trip_through_orbax(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  iterator = single_host(toy_task(), 4, seed=9)
  next(iterator)
  with ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True)) as mngr:
    mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    mngr.wait_until_finished()
    expected = targets(iterator, 3)
    resumed = single_host(toy_task(), 4, seed=9)
    mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert targets(resumed, 3) == expected
    with pytest.raises(ValueError, match='seed=9'):
      mngr.restore(1, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(single_host(toy_task(), 4, seed=8))))


def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match='shard_index 2'):
    make_batches(toy_task(), 4, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match='is empty'):
    make_batches(toy_task(num=3), 4, shard_index=0, shard_count=4)
  with pytest.raises(ValueError, match='batch_size'):
    single_host(toy_task(), 0)
  with pytest.raises(ValueError, match='not a state of make_batches'):
    single_host(toy_task(), 4).set_state({'next_index': 3})
