"""Data sets generated here (ListOps, Pathfinder), stored as TFDS array_record data sets.

A data set counts as prepared only when TFDS finished it: TFDS writes into an
`incomplete.*` folder and renames it at the end (see `tfds_files.find_prepared`).
`prepare` does nothing when the data set is already prepared. Hosts sharing a
file system may all call it: the lock file `<config folder>/prepare.lock`
(holding host, pid and time) lets one host prepare while the others wait for it.
Only the lock holder deletes leftovers of interrupted runs, so no host deletes
another's folder in progress; a lock left by a dead process of this host is
taken over.
"""

import importlib
import json
import os
import pathlib
import shutil
import socket
import time

from efficient_attn.data import common
from efficient_attn.data import tfds_files

BUILDERS = {
    'listops': ('efficient_attn.data.listops_builder', 'LraListops'),
    'pathfinder': ('efficient_attn.data.pathfinder_builder', 'LraPathfinder'),
}
LOCK_NAME = 'prepare.lock'
# Longer than preparing the largest config takes.
LOCK_TIMEOUT_S = 24 * 3600.0


def builder_class(task: str):
  """The TFDS builder class of a generated task."""
  common.check_choice('task', task, tuple(BUILDERS))
  module_name, class_name = BUILDERS[task]
  return getattr(importlib.import_module(module_name), class_name)


def config_names(task: str) -> tuple[str, ...]:
  """Names of the predefined configs of a generated task."""
  return tuple(config.name for config in builder_class(task).BUILDER_CONFIGS)


def prepare_command(task: str, config: str, data_dir=None) -> str:
  """The shell command that prepares `task`/`config`."""
  where = f' --data_dir {data_dir}' if data_dir is not None else ''
  return f'python -m efficient_attn.data.prepare {task} --config {config}{where}'


def _find(task: str, config: str, data_dir) -> pathlib.Path | None:
  """The prepared version folder of `task`/`config` (`tfds_files.find_prepared`), or None."""
  common.check_choice(f'{task} config', config, config_names(task))
  return tfds_files.find_prepared(data_dir, builder_class(task).name, config)


def prepare(task: str, config: str, data_dir=None, *, timeout_s: float = LOCK_TIMEOUT_S,
            poll_s: float = 5.0, **options) -> pathlib.Path:
  """Generates `task`/`config` unless it is already prepared; returns its version folder.

  Args:
    task: 'listops' or 'pathfinder'.
    config: a name from `config_names(task)`.
    data_dir: where to write; the first default data folder when None.
    timeout_s: how long to wait for another process preparing the same data.
    poll_s: seconds between checks while waiting.
    **options: builder options, e.g. workers=4 (pathfinder: processes drawing images).

  Returns:
    The version folder of the prepared data.

  Raises:
    TimeoutError: another process held the lock for longer than `timeout_s`.
  """
  found = _find(task, config, data_dir)
  if found is not None:
    print(f'{task} ({config}) is already prepared in {found}; nothing to do.')
    return found
  root = common.data_dirs(data_dir)[0]
  builder = builder_class(task)(config=config, data_dir=str(root), file_format='array_record',
                                **options)
  version_dir = pathlib.Path(builder.data_path)
  lock = version_dir.parent / LOCK_NAME
  found = _lock_or_wait(lock, lambda: _find(task, config, root), timeout_s, poll_s)
  if found is not None:
    print(f'{task} ({config}) was prepared by another process in {found}.')
    return found
  try:
    found = _find(task, config, root)
    if found is not None:  # prepared by the process that held the lock before
      return found
    _remove_leftovers(version_dir)
    builder.download_and_prepare()
  finally:
    lock.unlink(missing_ok=True)
  print(f'{task} ({config}) prepared in {version_dir}.')
  return version_dir


def _lock_or_wait(lock: pathlib.Path, find, timeout_s: float, poll_s: float):
  """Takes `lock` and returns None, or returns `find()` once another process prepared the data.

  Raises:
    TimeoutError: the lock stayed with another process for `timeout_s`.
  """
  deadline = time.monotonic() + timeout_s
  announced = False
  while not _take_lock(lock):
    found = find()
    if found is not None:
      return found
    holder = _lock_text(lock)
    if _is_stale(holder):
      _remove_stale(lock, holder)
      continue
    if time.monotonic() > deadline:
      raise TimeoutError(
          f'waited {timeout_s:.0f} s for {lock} ({holder or "unreadable"}) to go while another '
          'process prepares the data; delete it if no preparation is running')
    if not announced:
      print(f'waiting for the process holding {lock} ({holder}) to prepare the data')
      announced = True
    time.sleep(poll_s)
  return None


def _take_lock(lock: pathlib.Path) -> bool:
  """Creates `lock` holding this host, pid and time; False when it exists already."""
  lock.parent.mkdir(parents=True, exist_ok=True)
  try:
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': os.getpid(), 'time': time.time()}, f)
  return True


def _lock_text(lock: pathlib.Path) -> str:
  """What `lock` holds; '' when it is gone or not written yet."""
  try:
    return lock.read_text()
  except FileNotFoundError:
    return ''


def _is_stale(holder: str) -> bool:
  """Whether lock text `holder` names a process of this host that no longer runs."""
  try:
    owner = json.loads(holder)
  except ValueError:  # gone, or being written
    return False
  if owner.get('host') != socket.gethostname():
    return False
  try:
    os.kill(owner['pid'], 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, another user's
    return False
  return False


def _remove_stale(lock: pathlib.Path, holder: str) -> None:
  """Deletes `lock` if it still holds `holder`; puts back a lock taken meanwhile."""
  moved = lock.with_name(f'{lock.name}.stale.{os.getpid()}')
  try:
    os.rename(lock, moved)
  except FileNotFoundError:
    return
  if moved.read_text() != holder:
    try:
      os.link(moved, lock)
    except FileExistsError:
      pass
  moved.unlink()


def _remove_leftovers(version_dir: pathlib.Path) -> None:
  """Deletes interrupted preparations of `version_dir`; call only while holding the lock."""
  config_dir = version_dir.parent
  leftovers = [p for p in config_dir.iterdir() if p.name.startswith('incomplete.')]
  if version_dir.exists():  # not complete, or `prepare` would have found it
    leftovers.append(version_dir)
  for path in leftovers:
    if path.is_dir():
      shutil.rmtree(path)
    else:
      path.unlink()


def load_split(task: str, config: str, split: str, data_dir=None, prepare_if_missing=False):
  """The random-access source of a prepared split (TFDS-decoded example dicts).

  Raises:
    MissingDataError: the data is not prepared; the message gives the command.
    CorruptDataError: a data file is missing or damaged; the message names it.
  """
  version_dir = _find(task, config, data_dir)
  if version_dir is None and prepare_if_missing:
    version_dir = prepare(task, config, data_dir)
  command = prepare_command(task, config, data_dir)
  if version_dir is None:
    folders = common.data_dirs(data_dir)
    goes = '' if data_dir is not None else f'; it writes to {folders[0]}'
    raise common.MissingDataError(
        f'{task} ({config}) is not prepared in {", ".join(map(str, folders))}. Generate it '
        f'(no download) with: {command}{goes}')
  return tfds_files.read_split(version_dir, split, fix=f'delete {version_dir} and run: {command}')
