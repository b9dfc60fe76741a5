"""LRA Retrieval: does one ACL Anthology Network paper cite the other? Read from the LRA files.

Each example is a pair of documents at byte level (ids b + 1, 0 is padding), each
cut to `seq_len` bytes; label 1 when they are linked by a citation. A dual-encoder
task: examples hold 'inputs1' and 'inputs2'. The default length, 4000 bytes per
document, is that of LRA's released config (the paper says 4K; `seq_len=4096` is
one argument away).

Data (no download happens here): the LRA release archive lra_release.gz
(https://storage.googleapis.com/long-range-arena/lra_release.gz, from
https://github.com/google-research/long-range-arena), extracted so that
`<data_dir>/lra_release/tsv_data/new_aan_pairs.{train,eval,test}.tsv` exist. Each
line is `label<TAB>id1<TAB>id2<TAB>text1<TAB>text2`, no header, no quoting.
"""

import functools
import pathlib

from efficient_attn.data import common
from efficient_attn.data import tsv

NUM_CLASSES = 2
DEFAULT_SEQ_LEN = 4000  # LRA's released config
_FILE_SPLIT = {'train': 'train', 'valid': 'eval', 'test': 'test'}
_FIELDS = 5


def find_tsv(data_dir, split: str) -> pathlib.Path:
  """The TSV file of a split."""
  name = f'new_aan_pairs.{_FILE_SPLIT[split]}.tsv'
  return common.find_data(
      data_dir, [f'lra_release/tsv_data/{name}', f'lra_release/lra_release/tsv_data/{name}',
                 f'tsv_data/{name}'],
      what=f'LRA Retrieval ({split})', expected=f'lra_release/tsv_data/{name}',
      download=f'{common.LRA_RELEASE_URL} (extract it there)')


def _to_example(line: dict, max_len: int) -> dict:
  """Model example of a TSV line: both documents as byte ids, and the label."""
  fields = line['fields']
  return {'inputs1': common.encode_bytes(fields[3], max_len),
          'inputs2': common.encode_bytes(fields[4], max_len),
          'targets': line['label']}


def load(split: str, data_dir=None, seq_len: int | None = None) -> common.Task:
  """The LRA Retrieval task.

  Args:
    split: 'train', 'valid' (the LRA 'eval' file) or 'test'.
    data_dir: folder holding lra_release/; defaults searched when None.
    seq_len: bytes kept per document; 4000 (LRA) when None.

  Returns:
    The Task (pair=True); examples are {'inputs1', 'inputs2': int32 [<= seq_len]
    byte ids, 'targets': int32}.
  """
  common.check_choice('split', split, common.SPLITS)
  seq_len = seq_len or DEFAULT_SEQ_LEN
  lines = tsv.TsvLines(find_tsv(data_dir, split), _FIELDS, label_field=0,
                       parse_label=tsv.parse_class(NUM_CLASSES))
  source = common.MappedSource(lines, functools.partial(_to_example, max_len=seq_len))
  return common.Task(name='retrieval', split=split, source=source,
                     vocab_size=common.BYTE_VOCAB_SIZE, num_classes=NUM_CLASSES,
                     seq_len=seq_len, pair=True)
