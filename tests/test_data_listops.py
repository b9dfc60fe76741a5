"""ListOps generation against an independent evaluator, determinism, bounds, storage."""

import statistics

import numpy as np
import pytest

from efficient_attn.data import (CorruptDataError, MissingDataError, get_task, listops,
                                 make_batches)

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


def test_label_distribution_is_lra_s():
  # LRA's generator gives classes 0 and 9 about 17% each, the others 7-9%
  # (the standard error of a share is about 0.005 at 6000 draws).
  _, labels = listops.generate(6000, SETTING, seed=0)
  shares = np.bincount(labels, minlength=10) / len(labels)
  assert np.all((shares[[0, 9]] > 0.15) & (shares[[0, 9]] < 0.19)), shares
  assert np.all((shares[1:9] > 0.065) & (shares[1:9] < 0.10)), shares


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


def write_lra_listops(root, examples: dict) -> None:
  """LRA's listops-1000 files: a header, then `expression<TAB>value` lines."""
  folder = root / 'lra_release' / 'listops-1000'
  folder.mkdir(parents=True)
  for split, name in listops.LRA_FILES.items():
    lines = ['Source\tTarget'] + [f'{text}\t{value}' for text, value in examples[split]]
    (folder / name).write_text('\n'.join(lines) + '\n')


LRA_LINES = [('( ( ( [MAX 4 ) 3 ) ( ( [MIN 2 3 ) ] ) ) ]', 4), ('( ( [SM 7 ) 5 ) ]', 2)]


def test_lra_release_files_are_read_with_and_without_close_token(tmp_path):
  write_lra_listops(tmp_path, {'train': LRA_LINES, 'valid': LRA_LINES[:1], 'test': LRA_LINES})
  task = get_task('listops', tmp_path, split='train', source='lra_release')
  assert (len(task.source), task.vocab_size, task.seq_len) == (2, 16, 2000)
  assert listops.tokens_to_text(task.source[0]['inputs']) == '[MAX 4 3 [MIN 2 3 ] ]'
  assert [task.source[i]['targets'] for i in range(2)] == [4, 2]
  dropped = get_task('listops', tmp_path, split='valid', source='lra_release', close_token=False)
  assert dropped.vocab_size == 15 and len(dropped.source) == 1
  assert listops.tokens_to_text(dropped.source[0]['inputs']) == '[MAX 4 3 [MIN 2 3'


def test_close_token_dropped_from_generated_data(prepared_dir):
  kept = get_task('listops', prepared_dir, split='valid', config='tiny')
  dropped = get_task('listops', prepared_dir, split='valid', config='tiny', close_token=False)
  tokens = kept.source[0]['inputs']
  np.testing.assert_array_equal(dropped.source[0]['inputs'], tokens[tokens != listops.CLOSE_ID])
  assert dropped.vocab_size == 15


def test_lra_release_bad_files_are_named(tmp_path):
  with pytest.raises(MissingDataError, match='lra_release/listops-1000/basic_test.tsv'):
    get_task('listops', tmp_path, split='test', source='lra_release')
  write_lra_listops(tmp_path, {'train': LRA_LINES + [('( [MAX 1 2 ]', 12)], 'valid': [],
                               'test': LRA_LINES})
  with pytest.raises(CorruptDataError, match=r"basic_train.tsv, line 4: label b'12'"):
    get_task('listops', tmp_path, split='train', source='lra_release')
  with pytest.raises(CorruptDataError, match='basic_val.tsv holds no examples'):
    get_task('listops', tmp_path, split='valid', source='lra_release')
  with pytest.raises(ValueError, match="config='small' does not exist for source='lra_release'"):
    get_task('listops', tmp_path, config='small', source='lra_release')
