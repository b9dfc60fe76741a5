"""ListOps generation against an independent evaluator, determinism, bounds, storage."""

import statistics

import numpy as np
import pytest

from efficient_attn.data import get_task, listops, make_batches
from test_data_helpers import prepared_dir  # pylint: disable=unused-import

SETTING = listops.SETTINGS['lra']
SMALL = listops.SETTINGS['small']


def evaluate(words: list[str], position: int = 0) -> tuple[int, int, int]:
  """(value, next position, depth) of the expression starting at `words[position]`."""
  word = words[position]
  if word.isdigit():
    return int(word), position + 1, 1
  arguments, depth = [], 0
  position += 1
  while words[position] != ']':
    value, position, sub_depth = evaluate(words, position)
    arguments.append(value)
    depth = max(depth, sub_depth)
  assert 2 <= len(arguments) <= SETTING.max_args, arguments
  functions = {'[MIN': min, '[MAX': max, '[SM': lambda a: sum(a) % 10,
               '[MED': lambda a: int(statistics.median(a))}
  return functions[word](arguments), position + 1, depth + 1


@pytest.fixture(scope='module')
def paper_examples():
  return listops.generate(300, SETTING, seed=7)


def test_values_match_an_independent_evaluator(paper_examples):
  tokens, labels = paper_examples
  for sequence, label in zip(tokens, labels):
    words = listops.tokens_to_text(sequence).split()
    value, end, depth = evaluate(words)
    assert end == len(words)
    assert value == label
    assert depth <= SETTING.max_depth


def test_lengths_and_ids_within_bounds(paper_examples):
  tokens, labels = paper_examples
  lengths = np.array([len(t) for t in tokens])
  assert lengths.min() >= SETTING.min_length and lengths.max() <= SETTING.max_length
  assert all(t.min() >= 1 and t.max() < listops.VOCAB_SIZE for t in tokens)
  assert set(labels.tolist()) <= set(range(10))


def test_same_seed_same_bytes_other_seed_differs():
  first = listops.generate(200, SMALL, seed=3)
  again = listops.generate(200, SMALL, seed=3)
  other = listops.generate(200, SMALL, seed=4)
  assert b''.join(t.tobytes() for t in first[0]) == b''.join(t.tobytes() for t in again[0])
  assert np.array_equal(first[1], again[1])
  assert b''.join(t.tobytes() for t in first[0]) != b''.join(t.tobytes() for t in other[0])


def test_classes_roughly_balanced():
  _, labels = listops.generate(2000, SMALL, seed=0)
  shares = np.bincount(labels, minlength=10) / len(labels)
  assert shares.min() > 0.03 and shares.max() < 0.3, shares


def test_splits_are_distinct_and_sized():
  splits = listops.generate_splits(listops.SETTINGS['tiny'])
  assert {k: len(v[0]) for k, v in splits.items()} == {'train': 256, 'valid': 32, 'test': 32}
  seen = [t.tobytes() for split in splits.values() for t in split[0]]
  assert len(set(seen)) == len(seen)


def test_text_round_trip_reads_lra_file_syntax():
  text = '( ( ( [MAX 4 ) 3 ) ( ( [MIN 2 3 ) ] ) ) ]'
  tokens = listops.text_to_tokens(text)
  assert listops.tokens_to_text(tokens) == '[MAX 4 3 [MIN 2 3 ] ]'
  with pytest.raises(ValueError, match='unknown ListOps symbols'):
    listops.text_to_tokens('[FIRST 1 2 ]')


def test_prepared_tfds_data_matches_generator(prepared_dir):
  task = get_task('listops', prepared_dir, split='valid', config='tiny')
  expected_tokens, expected_labels = listops.generate_splits(listops.SETTINGS['tiny'])['valid']
  assert len(task.source) == len(expected_tokens)
  for i in (0, 5, len(expected_tokens) - 1):
    assert np.array_equal(task.source[i]['inputs'], expected_tokens[i])
    assert task.source[i]['targets'] == expected_labels[i]
  assert (task.vocab_size, task.num_classes, task.seq_len) == (16, 10, 64)
  batch = next(make_batches(task, 8, shard_index=0, shard_count=1))
  assert batch['inputs'].shape == (8, 64) and batch['inputs'].dtype == np.int32
  assert np.array_equal(batch['mask'], batch['inputs'] != 0)


def test_unknown_config_lists_the_valid_ones(prepared_dir):
  with pytest.raises(ValueError, match="'lra', 'small', 'tiny'"):
    get_task('listops', prepared_dir, config='huge')
