"""A grid of generated Pathfinder images (32, 64, 128 px; easy and hard) with their labels.

Usage:
  python -m experiments.pathfinder_samples --seed 0

Writes experiments/results/pathfinder_samples.png (or --out).
"""

import argparse
import pathlib

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

from efficient_attn.data import pathfinder  # pylint: disable=wrong-import-position

ROWS = ((32, 'hard'), (32, 'hard'), (32, 'easy'), (64, 'hard'), (128, 'hard'))
PER_ROW = 8


def save_samples(out: pathlib.Path, seed: int) -> None:
  """Draws `PER_ROW` images for each of `ROWS` and saves the grid to `out`."""
  figure, axes = plt.subplots(len(ROWS), PER_ROW, figsize=(2 * PER_ROW, 2.3 * len(ROWS)))
  for row, (resolution, difficulty) in enumerate(ROWS):
    setting = pathfinder.make_setting(resolution, difficulty)
    images = pathfinder.generate(PER_ROW, setting, seed=(seed, row))
    for column in range(PER_ROW):
      axis = axes[row, column]
      axis.imshow(images['image'][column], cmap='gray', vmin=0, vmax=255,
                  interpolation='nearest')
      verdict = 'connected' if images['label'][column] else 'not connected'
      axis.set_title(f'{resolution}px {difficulty}: {verdict}', fontsize=8)
      axis.axis('off')
  figure.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(out, dpi=100)
  plt.close(figure)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', type=pathlib.Path,
                      default=pathlib.Path(__file__).parent / 'results' / 'pathfinder_samples.png')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  save_samples(args.out, args.seed)
  print(f'saved {args.out}')


if __name__ == '__main__':
  main()
