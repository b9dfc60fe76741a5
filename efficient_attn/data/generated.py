"""Data sets generated here (ListOps, Pathfinder), stored as TFDS array_record data sets.

A data set counts as prepared only when TFDS finished it: TFDS writes into an
`incomplete.*` folder and renames it at the end, and a version folder without its
dataset_info.json and features.json (an interrupted copy, say) is not prepared.
`prepare` removes such leftovers before generating, and does nothing when the data
set is already prepared.
"""

import importlib
import pathlib
import shutil

from efficient_attn.data import common
from efficient_attn.data import tfds_files

BUILDERS = {
    'listops': ('efficient_attn.data.listops_builder', 'LraListops'),
    'pathfinder': ('efficient_attn.data.pathfinder_builder', 'LraPathfinder'),
}


def builder_class(task: str):
  """The TFDS builder class of a generated task."""
  common.check_choice('task', task, tuple(BUILDERS))
  module_name, class_name = BUILDERS[task]
  return getattr(importlib.import_module(module_name), class_name)


def config_names(task: str) -> tuple[str, ...]:
  """Names of the predefined configs of a generated task."""
  return tuple(config.name for config in builder_class(task).BUILDER_CONFIGS)


def make_builder(task: str, config: str, data_dir):
  """The builder of `task`/`config` writing to and reading from `data_dir`."""
  common.check_choice(f'{task} config', config, config_names(task))
  return builder_class(task)(config=config, data_dir=str(data_dir), file_format='array_record')


def prepare_command(task: str, config: str, data_dir=None) -> str:
  """The shell command that prepares `task`/`config`."""
  where = f' --data_dir {data_dir}' if data_dir is not None else ''
  return f'python -m efficient_attn.data.prepare {task} --config {config}{where}'


def is_prepared(builder) -> bool:
  """Whether TFDS finished preparing `builder`'s data."""
  return (pathlib.Path(builder.data_path) / 'dataset_info.json').exists() and builder.is_prepared()


def find_prepared(task: str, config: str, data_dir=None):
  """The builder of the first data folder holding a prepared copy, or None."""
  for root in common.data_dirs(data_dir):
    builder = make_builder(task, config, root)
    if is_prepared(builder):
      return builder
  return None


def remove_partial(builder) -> list[pathlib.Path]:
  """Deletes leftovers of interrupted preparations of `builder`; returns what was deleted."""
  version_dir = pathlib.Path(builder.data_path)
  config_dir = version_dir.parent
  removed = []
  if config_dir.exists():
    removed += [p for p in config_dir.iterdir() if p.name.startswith('incomplete.')]
  if version_dir.exists() and not is_prepared(builder):
    removed.append(version_dir)
  for path in removed:
    if path.is_dir():
      shutil.rmtree(path)
    else:
      path.unlink()
  return removed


def prepare(task: str, config: str, data_dir=None):
  """Generates `task`/`config` unless it is already prepared; returns the builder.

  Args:
    task: 'listops' or 'pathfinder'.
    config: a name from `config_names(task)`.
    data_dir: where to write; the first default data folder when None.

  Returns:
    The TFDS builder of the prepared data.
  """
  prepared = find_prepared(task, config, data_dir)
  if prepared is not None:
    return prepared
  builder = make_builder(task, config, common.data_dirs(data_dir)[0])
  remove_partial(builder)
  builder.download_and_prepare()
  return builder


def load_split(task: str, config: str, split: str, data_dir=None, prepare_if_missing=False):
  """The random-access TFDS data source of a prepared split.

  Raises:
    MissingDataError: the data is not prepared; the message gives the command.
    CorruptDataError: a data file is missing or unreadable; the message names it.
  """
  builder = find_prepared(task, config, data_dir)
  if builder is None and prepare_if_missing:
    builder = prepare(task, config, data_dir)
  if builder is None:
    searched = ', '.join(str(d) for d in common.data_dirs(data_dir))
    raise common.MissingDataError(
        f'{task} ({config}) is not prepared in {searched}. Generate it (no download needed) '
        f'with: {prepare_command(task, config, data_dir)}')
  _check_files(builder, split, prepare_command(task, config, data_dir))
  return builder.as_data_source(split=split)


def _check_files(builder, split: str, command: str) -> None:
  """Raises CorruptDataError naming a shard of `split` that is missing or not whole."""
  split_info = builder.info.splits[split]
  for path, expected in zip(split_info.filepaths, split_info.shard_lengths):
    path = pathlib.Path(path)
    advice = f'delete {builder.data_path} and run: {command}'
    if not path.exists():
      raise common.CorruptDataError(f'{path} is missing from the prepared data; {advice}')
    try:
      count = tfds_files.count_array_records(path)
    except common.CorruptDataError as error:
      raise common.CorruptDataError(f'{error}; {advice}') from error
    if count != expected:
      raise common.CorruptDataError(f'{path} holds {count} records, expected {expected}; {advice}')
