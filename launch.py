"""Launches an experiment from a config: train, evaluate the best checkpoint on test, write results.

  python launch.py                                   # ListOps, full attention, cpu scale
  python launch.py --config configs/listops.py:performer,cpu --workdir runs/lo-perf \
      --config.train.steps=500
  python launch.py --config configs/pathfinder.py:lsh,paper,128   # Path-X

The workdir (default runs/<task>-<attention>-<scale>) holds checkpoints,
metrics.jsonl, TensorBoard events and results.json. Relaunching a finished run
prints its results; relaunching an unfinished one resumes it.

Several hosts (GPU or TPU): one process per host, the same command on each, with
the workdir on a file system every host sees (orbax writes checkpoints collectively;
only process 0 writes metrics and results). With an explicit coordinator, e.g. two
GPU hosts, process 0's address and any free port:

  python launch.py --config configs/listops.py:full,paper --workdir /shared/runs/lo \
      --coordinator=10.0.0.1:1234 --num_processes=2 --process_id=0   # on host 0
  python launch.py --config configs/listops.py:full,paper --workdir /shared/runs/lo \
      --coordinator=10.0.0.1:1234 --num_processes=2 --process_id=1   # on host 1

On Cloud TPU pods and SLURM clusters JAX reads these from the environment: run
`python launch.py --config ... --workdir ... --distributed` on every host (e.g.
`gcloud compute tpus tpu-vm ssh NAME --worker=all --command="..."` or `srun`).
data.batch_size is the global batch; each process reads its own shard of the data.
The same works on one machine with CPU processes (tests/test_distributed.py).
"""

import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_CONFIG = f'{ROOT / "configs" / "listops.py"}:full,cpu'

config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'config file and its argument, '
                                'path/to/config.py:attention[,scale]', lock_config=True)
flags.DEFINE_string('workdir', None, 'run folder; default runs/<task>-<attention>-<scale>')
flags.DEFINE_string('coordinator', None, 'HOST:PORT of process 0, for runs over several hosts')
flags.DEFINE_integer('num_processes', None, 'number of processes (hosts)')
flags.DEFINE_integer('process_id', None, 'index of this process')
flags.DEFINE_bool('distributed', False, 'call jax.distributed.initialize() with the settings '
                  'the cluster provides (Cloud TPU, SLURM, ...)')
FLAGS = flags.FLAGS


def default_workdir(config) -> pathlib.Path:
  """runs/<task>-<attention>-<scale> under the current folder."""
  return pathlib.Path('runs') / f'{config.task}-{config.model.attention}-{config.scale}'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.coordinator or FLAGS.distributed:
    if FLAGS.coordinator and (FLAGS.num_processes is None or FLAGS.process_id is None):
      raise app.UsageError('--coordinator needs --num_processes and --process_id')
    # Collectives between CPU processes (no effect on GPU/TPU devices).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  from efficient_attn import train  # pylint: disable=g-import-not-at-top
  from efficient_attn.data import MissingDataError  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  workdir = pathlib.Path(FLAGS.workdir) if FLAGS.workdir else default_workdir(config)
  try:
    train.train_and_evaluate(config, workdir)
  except (ValueError, MissingDataError, train.CheckpointError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
