"""One entry point for every task: `get_task(name, data_dir, split, seq_len, **options)`."""

from typing import Callable

from efficient_attn.data import common
from efficient_attn.data import image
from efficient_attn.data import listops
from efficient_attn.data import pathfinder
from efficient_attn.data import retrieval
from efficient_attn.data import stdlib_lm
from efficient_attn.data import text

TASKS: dict[str, Callable[..., common.Task]] = {
    'listops': listops.load,
    'text': text.load,
    'retrieval': retrieval.load,
    'image': image.load,
    'pathfinder': pathfinder.load,
    'pathx': pathfinder.load_pathx,
    'stdlib_lm': stdlib_lm.load,
}


def available_tasks() -> tuple[str, ...]:
  """Names accepted by `get_task`."""
  return tuple(TASKS)


def get_task(name: str, data_dir=None, split: str = 'train', seq_len: int | None = None,
             **options) -> common.Task:
  """A split of a task: its random-access source and what a model needs to know.

  Args:
    name: one of `available_tasks()`: 'listops', 'text', 'retrieval', 'image',
      'pathfinder', 'pathx' (Pathfinder at 128x128) or 'stdlib_lm'.
    data_dir: folder of prepared or downloaded data; None searches $TFDS_DATA_DIR,
      ~/tensorflow_datasets and ./data.
    split: 'train', 'valid' or 'test'.
    seq_len: input length; the task's paper setting when None.
    **options: task options, e.g. config='small' (listops), resolution=64 and
      difficulty='easy' (pathfinder), source='lra_release' (pathfinder),
      source='aclImdb' (text), prepare_if_missing=True (generated tasks).

  Returns:
    A `Task` with fields source, vocab_size, num_classes, seq_len, pair, metric,
    causal_lm; pass it to `make_batches`.
  """
  common.check_choice('task', name, available_tasks())
  return TASKS[name](split=split, data_dir=data_dir, seq_len=seq_len, **options)
