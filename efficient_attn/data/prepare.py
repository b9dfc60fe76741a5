"""Prepares the generated data sets and reports which tasks can be read.

  python -m efficient_attn.data.prepare listops --config lra --data_dir ~/tensorflow_datasets
  python -m efficient_attn.data.prepare pathfinder --resolution 32 --difficulty hard --workers 4
  python -m efficient_attn.data.prepare status --data_dir ~/tensorflow_datasets

Preparing is idempotent (a prepared data set is left alone), safe to interrupt
(data is written to a temporary folder that becomes the data set only when
complete; the next run removes leftovers) and safe to start on several hosts
sharing a file system (one prepares, the others wait for it).
"""

import argparse
import sys

from efficient_attn.data import common
from efficient_attn.data import generated
from efficient_attn.data import listops
from efficient_attn.data import pathfinder
from efficient_attn.data import tasks

def _status(read, missing: str | None = None) -> str:
  """'train 10, valid 2, test 2' for `read(split)` returning sources, else what is wrong."""
  try:
    return ', '.join(f'{split} {len(read(split))}' for split in common.SPLITS)
  except common.MissingDataError as error:
    return missing or f'NOT READY. {error}'
  except common.CorruptDataError as error:
    return f'DAMAGED. {error}'


def print_status(data_dir=None) -> None:
  """Prints one line per generated config and per other task: split sizes, or what to do."""
  for task in generated.BUILDERS:
    for config in generated.config_names(task):
      status = _status(lambda split: generated.load_split(task, config, split, data_dir),
                       f'not prepared; run: {generated.prepare_command(task, config, data_dir)}')
      print(f'{task} {config}: {status}')
  for name in tasks.available_tasks():
    if name in generated.BUILDERS or name == 'pathx':  # pathx: the 128 px Pathfinder configs
      continue
    status = _status(lambda split: tasks.get_task(name, data_dir, split=split).source)
    print(f'{name}: {status}')


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
  status = commands.add_parser('status', help='report which tasks can be read')
  for command in (lo, pf, status):
    command.add_argument('--data_dir', default=None,
                         help='data folder (default: $TFDS_DATA_DIR or ~/tensorflow_datasets, '
                              'then ./data)')
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs the command line `argv`."""
  args = _parser().parse_args(argv)
  if args.command == 'listops':
    generated.prepare('listops', args.config, args.data_dir)
  elif args.command == 'pathfinder':
    config = args.config or pathfinder.config_name(args.resolution, args.difficulty)
    generated.prepare('pathfinder', config, args.data_dir, workers=args.workers)
  else:
    print_status(args.data_dir)
  return 0


if __name__ == '__main__':
  sys.exit(main())
