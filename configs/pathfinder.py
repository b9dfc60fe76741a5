"""Pathfinder (LRA): are the two dots connected by a path; 32/64/128 (Path-X)/256 px.

  python launch.py --config configs/pathfinder.py:full,cpu,32 --workdir runs/pf32-full-cpu

arg 'attention[,scale[,resolution]]'. paper: the public LRA code's Pathfinder-32
transformer config (4 layers, emb 32, 4 heads of qkv 16, mlp 32, mean pooling,
62400 steps of batch 512, cosine learning rate 1e-3; Transformer 71.40% test
accuracy at 32 px, LRA Table 1; Path-X: no model beat chance). One change: learned
positions instead of LRA's fixed sinusoids, with which Pathfinder runs stall at
50% on many seeds. cpu: the same model, 1500 steps of batch 16 (24K examples, a
sixth of an epoch; the paper's run sees 32M). That is not a run of minutes: full
attention trains at 0.40 steps/s at batch 16 on 2 cores at load 2 (0.15 at batch
64), so this takes about an hour. Measured (full attention, seed 0, load 4-7, run
stopped at step 250 for time): validation accuracy 50.0%, chance; whether a CPU
run of this length leaves chance is not known yet.
"""

from configs import base

RESOLUTIONS = (32, 64, 128, 256)
PAPER_MODEL = {'num_layers': 4, 'emb_dim': 32, 'num_heads': 4, 'qkv_dim': 16, 'mlp_dim': 32,
               'pos_encoding': 'learned', 'pooling': 'mean'}


def get_config(arg: str | None = None):
  """The Pathfinder config for arg 'attention[,scale[,resolution]]' (default 'full,cpu,32')."""
  parts = (arg or '').split(',')
  attention, scale = base.parse_arg(','.join(parts[:2]))
  resolution = int(parts[2]) if len(parts) > 2 and parts[2] else 32
  if resolution not in RESOLUTIONS:
    raise ValueError(f'resolution {resolution} does not exist; available: {RESOLUTIONS}')
  task = 'pathx' if resolution == 128 else 'pathfinder'
  options = {} if task == 'pathx' else {'resolution': resolution}
  seq_len = resolution * resolution
  if scale == 'paper':
    return base.task_config(
        task=task, attention=attention, scale=scale, seq_len=seq_len, task_options=options,
        model=PAPER_MODEL, data={'batch_size': 512},
        train={'steps': 62400, 'learning_rate': 1e-3, 'schedule': 'cosine',
               'warmup_steps': 312, 'grad_clip': 0.0, 'eval_every': 312,
               'checkpoint_every': 3120})
  if scale == 'cpu':
    return base.task_config(
        task=task, attention=attention, scale=scale, seq_len=seq_len, task_options=options,
        model=PAPER_MODEL, data={'batch_size': 16},
        train={'steps': 1500, 'learning_rate': 1e-3, 'schedule': 'cosine',
               'warmup_steps': 150, 'eval_every': 250, 'eval_batches': 16,
               'checkpoint_every': 250})
  return base.task_config(
      task=task, attention=attention, scale=scale, seq_len=seq_len,
      task_options={'config': 'tiny'} if resolution == 32 else options,
      model={**base.TINY_MODEL, 'pos_encoding': 'learned', 'pooling': 'mean'},
      data=base.TINY_DATA, train=base.TINY_TRAIN)
