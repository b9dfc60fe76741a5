"""Prepares the generated data sets and reports which tasks can be read.

  python -m efficient_attn.data.prepare listops --config lra --data_dir ~/tensorflow_datasets
  python -m efficient_attn.data.prepare pathfinder --resolution 32 --difficulty hard
  python -m efficient_attn.data.prepare samples --out experiments/results/pathfinder_samples.png
  python -m efficient_attn.data.prepare status --data_dir ~/tensorflow_datasets

Preparing is idempotent (a prepared data set is left alone) and safe to interrupt:
data is written to a temporary folder that becomes the data set only when
complete, and leftovers of an interrupted run are removed by the next one.
"""

import argparse
import pathlib
import sys

from efficient_attn.data import common
from efficient_attn.data import generated
from efficient_attn.data import listops
from efficient_attn.data import pathfinder
from efficient_attn.data import tasks


def prepare_listops(config: str, data_dir=None) -> pathlib.Path:
  """Generates ListOps `config` unless prepared; returns its folder."""
  common.check_choice('config', config, tuple(listops.SETTINGS))
  return _prepare('listops', config, data_dir)


def prepare_pathfinder(config: str, data_dir=None, workers: int = 1) -> pathlib.Path:
  """Generates Pathfinder `config` unless prepared; returns its folder."""
  common.check_choice('config', config, tuple(pathfinder.SETTINGS))
  generated.builder_class('pathfinder').workers = workers
  return _prepare('pathfinder', config, data_dir)


def _prepare(task: str, config: str, data_dir) -> pathlib.Path:
  """Prepares a generated data set and says where it is."""
  existing = generated.find_prepared(task, config, data_dir)
  if existing is not None:
    print(f'{task} ({config}) is already prepared in {existing.data_path}; nothing to do.')
    return pathlib.Path(existing.data_path)
  builder = generated.prepare(task, config, data_dir)
  print(f'{task} ({config}) prepared in {builder.data_path}.')
  return pathlib.Path(builder.data_path)


def save_pathfinder_samples(out: str | pathlib.Path, seed: int = 0) -> pathlib.Path:
  """Saves a grid of generated Pathfinder images (32, 64, 128 px; easy and hard) with labels."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [(32, 'hard'), (32, 'hard'), (32, 'easy'), (64, 'hard'), (128, 'hard')]
  per_row = 8
  figure, axes = plt.subplots(len(rows), per_row, figsize=(2 * per_row, 2.3 * len(rows)))
  for row, (resolution, difficulty) in enumerate(rows):
    setting = pathfinder.make_setting(resolution, difficulty)
    images = pathfinder.generate(per_row, setting, seed=(seed, row))
    for column in range(per_row):
      axis = axes[row, column]
      axis.imshow(images['image'][column], cmap='gray', vmin=0, vmax=255,
                  interpolation='nearest')
      verdict = 'connected' if images['label'][column] else 'not connected'
      axis.set_title(f'{resolution}px {difficulty}: {verdict}', fontsize=8)
      axis.axis('off')
  figure.tight_layout()
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(out, dpi=100)
  plt.close(figure)
  print(f'saved {out}')
  return out


def print_status(data_dir=None) -> None:
  """Prints, for each task, whether its data can be read and what to do if not."""
  for name in tasks.available_tasks():
    try:
      task = tasks.get_task(name, data_dir, split='valid')
      print(f'{name}: ready ({len(task.source)} validation examples)')
    except (common.MissingDataError, common.CorruptDataError) as error:
      print(f'{name}: NOT READY. {error}')


def _parser() -> argparse.ArgumentParser:
  """The command-line interface."""
  parser = argparse.ArgumentParser(prog='python -m efficient_attn.data.prepare',
                                   description=__doc__.split('\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  lo = commands.add_parser('listops', help='generate ListOps')
  lo.add_argument('--config', default='lra', choices=tuple(listops.SETTINGS))
  pf = commands.add_parser('pathfinder', help='generate Pathfinder')
  pf.add_argument('--resolution', type=int, default=32, choices=pathfinder.RESOLUTIONS)
  pf.add_argument('--difficulty', default='hard', choices=tuple(pathfinder.DIFFICULTIES))
  pf.add_argument('--config', default=None, choices=tuple(pathfinder.SETTINGS),
                  help='a named config; overrides --resolution and --difficulty')
  pf.add_argument('--workers', type=int, default=1, help='processes drawing images')
  samples = commands.add_parser('samples', help='save a grid of Pathfinder samples')
  samples.add_argument('--out', default='experiments/results/pathfinder_samples.png')
  samples.add_argument('--seed', type=int, default=0)
  commands.add_parser('status', help='report which tasks can be read')
  for command in (lo, pf, commands.choices['status']):
    command.add_argument('--data_dir', default=None,
                         help='data folder (default: $TFDS_DATA_DIR or ~/tensorflow_datasets, '
                              'then ./data)')
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the command line `argv`."""
  args = _parser().parse_args(argv)
  if args.command == 'listops':
    prepare_listops(args.config, args.data_dir)
  elif args.command == 'pathfinder':
    config = args.config or pathfinder.config_name(args.resolution, args.difficulty)
    prepare_pathfinder(config, args.data_dir, args.workers)
  elif args.command == 'samples':
    save_pathfinder_samples(args.out, args.seed)
  else:
    print_status(args.data_dir)
  return 0


if __name__ == '__main__':
  sys.exit(main())
