"""ListOps as in Long Range Arena (Tay et al. 2020), generated here from a seed.

An example is a nested expression over the digits 0-9 with the operators MIN, MAX,
MED (median, rounded down) and SM (sum modulo 10), e.g. `[MAX 4 3 [MIN 2 3 ] 1 0 ]`;
its label is the value (10 classes). Paper setting ('lra'): depth <= 10, 2 to 10
arguments per operator, 500 to 2000 tokens, 96K/2K/2K train/valid/test. The
'small' setting keeps the grammar at 100 to 512 tokens for CPU runs; 'tiny' (20 to 64
tokens, a few hundred examples) is for tests.

The distribution is the LRA generator's: below the maximum depth a node is an
operator with probability 0.25, otherwise a digit; trees outside the length bounds
are rejected (the bounds themselves are allowed here, not in LRA) and duplicates
dropped. Trees are drawn a whole forest at a time with numpy from a seeded
generator, so a seed always gives the same examples, byte for byte. (The LRA
script set no seed, so its files cannot be regenerated.)

Token ids: 0 padding, 1-10 the digits 0-9, 11-14 `[MIN [MAX [MED [SM`, 15 `]`.
The parentheses in the LRA files only spell out the binary tree its generator
built and are not tokens. The LRA input pipeline's alphanumeric tokenizer also
dropped `]`, which made its sequences about 15% shorter and the task ambiguous;
by default `]` is kept here, as LRA's later fix and other reimplementations do
(`close_token=False` drops it as LRA's published runs did; 15 ids then).

Sources: `source='generated'` (the default) reads the data generated here, which
must be prepared once: `python -m efficient_attn.data.prepare listops --config lra`.
`source='lra_release'` reads LRA's own files
`<data_dir>/lra_release/listops-1000/basic_{train,val,test}.tsv` (a header
`Source<TAB>Target`, then one expression and its value per line), so that results
can be reported on LRA's test set.
"""

import dataclasses
import functools
import hashlib
from typing import Callable

import numpy as np

from efficient_attn.data import common
from efficient_attn.data import tsv

OPERATORS = ('[MIN', '[MAX', '[MED', '[SM')
CLOSE = ']'
VOCAB = ('<pad>',) + tuple(str(d) for d in range(10)) + OPERATORS + (CLOSE,)
VOCAB_SIZE = len(VOCAB)
NUM_CLASSES = 10
FIRST_DIGIT_ID = 1
FIRST_OPERATOR_ID = 11
CLOSE_ID = 15
MIN_OP, MAX_OP, MED_OP, SUM_MOD_OP = range(4)
OPERATOR_PROBABILITY = 0.25
# Trees drawn per numpy batch; part of what a seed means, so never change it.
TREES_PER_DRAW = 8192


@dataclasses.dataclass(frozen=True)
class ListOpsSetting:
  """Grammar bounds, split sizes and seed of a ListOps data set."""
  min_length: int = 500
  max_length: int = 2000
  max_depth: int = 10
  max_args: int = 10
  num_train: int = 96_000
  num_valid: int = 2_000
  num_test: int = 2_000
  seed: int = 0

  def split_sizes(self) -> dict[str, int]:
    """Number of examples of each split."""
    return {'train': self.num_train, 'valid': self.num_valid, 'test': self.num_test}


SETTINGS = {
    'lra': ListOpsSetting(),
    'small': ListOpsSetting(min_length=100, max_length=512),
    'tiny': ListOpsSetting(min_length=20, max_length=64, num_train=256, num_valid=32,
                           num_test=32),
}


@dataclasses.dataclass
class _Level:
  """The nodes of one depth of a forest, children of one parent stored together."""
  is_operator: np.ndarray  # bool [nodes]
  num_children: np.ndarray  # int [nodes]; 0 for digits
  symbol: np.ndarray  # uint8 token id [nodes]
  parent: np.ndarray  # index into the level above; the tree index at the root level

  def first_child(self) -> np.ndarray:
    """Index in the next level of each node's first child."""
    return np.cumsum(self.num_children) - self.num_children


def _draw_forest(rng: np.random.Generator, num_trees: int, max_depth: int,
                 max_args: int) -> list[_Level]:
  """Draws `num_trees` random expression trees, level by level."""
  levels = []
  parent = np.arange(num_trees)
  for depth in range(1, max_depth + 1):
    count = len(parent)
    if depth < max_depth:
      is_operator = rng.random(count) < OPERATOR_PROBABILITY
    else:
      is_operator = np.zeros(count, dtype=bool)
    num_operators = int(is_operator.sum())
    num_children = np.zeros(count, dtype=np.int64)
    num_children[is_operator] = rng.integers(2, max_args + 1, num_operators)
    symbol = np.empty(count, dtype=np.uint8)
    symbol[is_operator] = FIRST_OPERATOR_ID + rng.integers(0, 4, num_operators, dtype=np.uint8)
    symbol[~is_operator] = FIRST_DIGIT_ID + rng.integers(0, 10, count - num_operators,
                                                         dtype=np.uint8)
    levels.append(_Level(is_operator, num_children, symbol, parent))
    parent = np.repeat(np.arange(count), num_children)
    if not len(parent):
      break
  return levels


def _subtree_sizes(levels: list[_Level]) -> list[np.ndarray]:
  """Token count of every node's subtree: 1 for a digit, 2 + children for an operator."""
  sizes = [None] * len(levels)
  below = None
  for depth in reversed(range(len(levels))):
    level = levels[depth]
    size = np.ones(len(level.symbol), dtype=np.int64)
    if below is not None:
      child_total = np.bincount(levels[depth + 1].parent, weights=below, minlength=len(size))
      size[level.is_operator] = 2 + child_total[level.is_operator].astype(np.int64)
    sizes[depth] = below = size
  return sizes


def _keep_trees(levels: list[_Level], keep: np.ndarray) -> list[_Level]:
  """The forest restricted to the trees where `keep` is True."""
  kept_levels = []
  node_kept = keep
  new_index = np.cumsum(keep) - 1
  for depth, level in enumerate(levels):
    if depth:
      node_kept = node_kept[level.parent]
    parent = new_index[level.parent[node_kept]] if depth else np.arange(int(keep.sum()))
    kept_levels.append(_Level(level.is_operator[node_kept], level.num_children[node_kept],
                              level.symbol[node_kept], parent))
    new_index = np.cumsum(node_kept) - 1
  return [level for level in kept_levels if len(level.symbol)]


def _serialise(levels: list[_Level], sizes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Pre-order token ids of all trees, concatenated, and each tree's start offset."""
  offsets = np.concatenate([[0], np.cumsum(sizes[0])])
  tokens = np.empty(offsets[-1], dtype=np.uint8)
  position = offsets[:-1]
  for depth, level in enumerate(levels):
    tokens[position] = level.symbol
    operators = level.is_operator
    tokens[position[operators] + sizes[depth][operators] - 1] = CLOSE_ID
    if depth + 1 < len(levels):
      child_sizes = sizes[depth + 1]
      parent = levels[depth + 1].parent
      before = np.cumsum(child_sizes) - child_sizes
      before_in_parent = before - before[level.first_child()[parent]]
      position = position[parent] + 1 + before_in_parent
  return tokens, offsets


def _evaluate(levels: list[_Level]) -> np.ndarray:
  """Value of every tree in the forest."""
  values = None
  for depth in reversed(range(len(levels))):
    level = levels[depth]
    node_values = level.symbol.astype(np.int64) - FIRST_DIGIT_ID
    operators = np.flatnonzero(level.is_operator)
    if len(operators):
      node_values[operators] = _apply_operators(level, operators, values,
                                                levels[depth + 1].parent)
    values = node_values
  return values


def _apply_operators(level: _Level, operators: np.ndarray, child_values: np.ndarray,
                     child_parent: np.ndarray) -> np.ndarray:
  """Values of the operator nodes `operators` of `level` from their children's values."""
  starts = level.first_child()[operators]
  counts = level.num_children[operators]
  results = np.empty((4, len(operators)), dtype=np.int64)
  results[MIN_OP] = np.minimum.reduceat(child_values, starts)
  results[MAX_OP] = np.maximum.reduceat(child_values, starts)
  results[SUM_MOD_OP] = np.add.reduceat(child_values, starts) % 10
  results[MED_OP] = _medians(operators, counts, child_values, child_parent, len(level.symbol))
  kind = level.symbol[operators].astype(np.int64) - FIRST_OPERATOR_ID
  return results[kind, np.arange(len(operators))]


def _medians(operators: np.ndarray, counts: np.ndarray, child_values: np.ndarray,
             child_parent: np.ndarray, num_nodes: int) -> np.ndarray:
  """Medians (rounded down) of the digit children of the nodes `operators`."""
  histogram = np.bincount(child_parent * 10 + child_values, minlength=num_nodes * 10)
  at_or_below = np.cumsum(histogram.reshape(num_nodes, 10)[operators], axis=1)
  # The k-th smallest value (from 0) is the first digit with more than k values at or below it.
  lower = np.argmax(at_or_below > ((counts - 1) // 2)[:, None], axis=1)
  upper = np.argmax(at_or_below > (counts // 2)[:, None], axis=1)
  return (lower + upper) // 2


def generate(num_examples: int, setting: ListOpsSetting = SETTINGS['lra'],
             seed: int | None = None,
             progress: Callable[[int], None] | None = None) -> tuple[list[np.ndarray], np.ndarray]:
  """Generates distinct ListOps examples.

  Args:
    num_examples: how many examples.
    setting: grammar and length bounds.
    seed: random seed; `setting.seed` when None.
    progress: called with the number of new examples after each batch.

  Returns:
    (tokens, labels): a list of uint8 token-id arrays and an int64 array of values.
  """
  rng = np.random.default_rng(setting.seed if seed is None else seed)
  seen = set()
  tokens, labels = [], []
  while len(tokens) < num_examples:
    levels = _draw_forest(rng, TREES_PER_DRAW, setting.max_depth, setting.max_args)
    lengths = _subtree_sizes(levels)[0]
    keep = (lengths >= setting.min_length) & (lengths <= setting.max_length)
    if not keep.any():
      continue
    levels = _keep_trees(levels, keep)
    flat, offsets = _serialise(levels, _subtree_sizes(levels))
    values = _evaluate(levels)
    before = len(tokens)
    for i, value in enumerate(values):
      sequence = flat[offsets[i]:offsets[i + 1]]
      digest = hashlib.blake2b(sequence.tobytes(), digest_size=16).digest()
      if digest in seen:
        continue
      seen.add(digest)
      tokens.append(sequence)
      labels.append(value)
      if len(tokens) == num_examples:
        break
    if progress is not None:
      progress(len(tokens) - before)
  return tokens, np.asarray(labels, dtype=np.int64)


def generate_splits(setting: ListOpsSetting,
                    progress: Callable[[int], None] | None = None) -> dict:
  """All splits of `setting`, cut in order from one stream of distinct examples.

  Returns:
    {split: (tokens, labels)} as `generate` returns them.
  """
  sizes = setting.split_sizes()
  tokens, labels = generate(sum(sizes.values()), setting, progress=progress)
  splits, start = {}, 0
  for split in common.SPLITS:
    stop = start + sizes[split]
    splits[split] = (tokens[start:stop], labels[start:stop])
    start = stop
  return splits


def tokens_to_text(tokens: np.ndarray) -> str:
  """The expression spelled by token ids, padding left out."""
  return ' '.join(VOCAB[t] for t in np.asarray(tokens) if t != common.PAD_ID)


_TOKEN_IDS = {symbol.encode(): i for i, symbol in enumerate(VOCAB)}
_SKIPPED = frozenset((b'(', b')'))


def text_to_tokens(text: str | bytes) -> np.ndarray:
  """Token ids of an expression; LRA-file parentheses are skipped."""
  if isinstance(text, str):
    text = text.encode()
  words = [w for w in text.split() if w not in _SKIPPED]
  try:
    return np.array([_TOKEN_IDS[w] for w in words], dtype=np.uint8)
  except KeyError:
    unknown = sorted({w.decode(errors='replace') for w in words} - set(VOCAB))
    raise ValueError(f'unknown ListOps symbols {unknown}; known: {VOCAB[1:]}') from None


def _to_example(tokens: np.ndarray, label, close_token: bool) -> dict:
  """Model example of a token sequence and its value."""
  tokens = np.asarray(tokens)
  if not close_token:
    tokens = tokens[tokens != CLOSE_ID]
  return {'inputs': tokens.astype(np.int32), 'targets': np.int32(label)}


def _from_record(record: dict, close_token: bool) -> dict:
  """Model example of a prepared record."""
  return _to_example(record['tokens'], record['label'], close_token)


def _from_line(line: dict, close_token: bool) -> dict:
  """Model example of a line of an LRA file."""
  return _to_example(text_to_tokens(line['fields'][0]), line['label'], close_token)


LRA_FILES = {'train': 'basic_train.tsv', 'valid': 'basic_val.tsv', 'test': 'basic_test.tsv'}


def find_lra_file(data_dir, split: str):
  """The LRA ListOps file of a split."""
  name = f'listops-1000/{LRA_FILES[split]}'
  return common.find_data(
      data_dir, [f'lra_release/{name}', f'lra_release/lra_release/{name}', name],
      what=f'LRA ListOps ({split})', expected=f'lra_release/{name}',
      download=f'{common.LRA_RELEASE_URL} (extract it there)',
      hint="Or generate ListOps here (source='generated').")


def load(split: str, data_dir=None, seq_len: int | None = None, config: str = 'lra',
         source: str = 'generated', close_token: bool = True,
         prepare_if_missing: bool = False) -> common.Task:
  """A ListOps split, generated here or read from LRA's files.

  Args:
    split: 'train', 'valid' or 'test'.
    data_dir: folder of prepared data sets (TFDS layout) or of lra_release/;
      defaults searched when None.
    seq_len: model input length; when None the setting's max_length (2000 for LRA).
    config: 'lra' (paper), 'small' or 'tiny'; only 'lra' with source='lra_release'.
    source: 'generated' (prepared here) or 'lra_release' (LRA's TSV files).
    close_token: keep `]` (16 ids); False drops it as LRA's tokenizer did (15 ids).
    prepare_if_missing: generate the data when it is not prepared yet.

  Returns:
    The Task; examples are {'inputs': int32 [length], 'targets': int32}.
  """
  from efficient_attn.data import generated  # pylint: disable=g-import-not-at-top
  common.check_choice('split', split, common.SPLITS)
  common.check_choice('config', config, tuple(SETTINGS))
  common.check_choice('source', source, ('generated', 'lra_release'))
  if source == 'lra_release':
    if config != 'lra':
      raise ValueError(f"config={config!r} does not exist for source='lra_release'; "
                       "LRA's files are config 'lra'")
    lines = tsv.TsvLines(find_lra_file(data_dir, split), 2, label_field=1,
                         parse_label=tsv.parse_class(NUM_CLASSES), header=b'Source')
    examples = common.MappedSource(lines, functools.partial(_from_line, close_token=close_token))
  else:
    records = generated.load_split('listops', config, split, data_dir, prepare_if_missing)
    examples = common.MappedSource(records,
                                   functools.partial(_from_record, close_token=close_token))
  return common.Task(
      name='listops', split=split, source=examples,
      vocab_size=VOCAB_SIZE if close_token else CLOSE_ID, num_classes=NUM_CLASSES,
      seq_len=seq_len or SETTINGS[config].max_length)
