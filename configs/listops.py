"""ListOps (LRA): the value of a nested MIN/MAX/MED/SUM_MOD expression, 10 classes.

  python launch.py --config configs/listops.py:full,cpu --workdir runs/listops-full-cpu

paper: the public LRA code's base config (4 layers, emb 512, length 2000, 5000
steps), which gives the published numbers (Transformer 36.37% test accuracy,
LRA Table 1); cpu: the 'small' ListOps (100-512 tokens), 2 layers of width 64,
600 steps of batch 16. Measured (`python launch.py`, full attention, seed 0, 8.5
min on 2 cores): test accuracy 34.8% (majority class about 17%); validation
17.6% at step 200, 15.6% at 400, 32.4% at 600.
"""

from configs import base


def get_config(arg: str | None = None):
  """The ListOps config for arg 'attention[,scale]' (default 'full,cpu')."""
  attention, scale = base.parse_arg(arg)
  if scale == 'paper':
    return base.task_config(
        task='listops', attention=attention, scale=scale, seq_len=2000,
        task_options={'config': 'lra'},
        model={'num_layers': 4, 'emb_dim': 512, 'num_heads': 8, 'qkv_dim': 512,
               'mlp_dim': 1024},
        train={'steps': 5000, 'learning_rate': 0.05, 'warmup_steps': 1000,
               'weight_decay': 0.1, 'grad_clip': 0.0, 'eval_every': 1000,
               'checkpoint_every': 1000})
  if scale == 'cpu':
    return base.task_config(
        task='listops', attention=attention, scale=scale, seq_len=512,
        task_options={'config': 'small'},
        model={}, data={'batch_size': 16},
        train={'steps': 600, 'learning_rate': 0.05, 'warmup_steps': 200, 'weight_decay': 0.1,
               'eval_every': 200, 'eval_batches': 16, 'checkpoint_every': 200})
  return base.task_config(
      task='listops', attention=attention, scale=scale, seq_len=64,
      task_options={'config': 'tiny'}, model=base.TINY_MODEL,
      data=base.TINY_DATA, train=base.TINY_TRAIN)
