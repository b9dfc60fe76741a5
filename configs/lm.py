"""Byte-level language modelling on the Python standard library (stdlib_lm), in bits per byte.

  python launch.py --config configs/lm.py:full,cpu --workdir runs/lm-full-cpu

No LRA counterpart: the sizes are this project's. paper: 6 layers, emb 512,
8 heads, 1024 bytes, 20000 steps (for accelerators); cpu: 2 layers of width 128,
256 bytes, 1500 steps. Needs only the interpreter's own library. Causal: only
mechanisms that support causal attention can be used. Measured (`python launch.py
--config configs/lm.py:full,cpu`, seed 0, 44 min on 2 cores shared with other jobs,
load 3-7): test 2.14 bits per byte; validation 2.96 at step 500, 2.45 at 1000,
2.24 at 1500.
"""

from configs import base


def get_config(arg: str | None = None):
  """The language-modelling config for arg 'attention[,scale]' (default 'full,cpu')."""
  attention, scale = base.parse_arg(arg)
  if scale == 'paper':
    return base.task_config(
        task='stdlib_lm', attention=attention, scale=scale, seq_len=1024,
        model={'num_layers': 6, 'emb_dim': 512, 'num_heads': 8, 'qkv_dim': 512,
               'mlp_dim': 2048, 'pooling': 'none'},
        train={'steps': 20000, 'learning_rate': 0.05, 'warmup_steps': 4000,
               'weight_decay': 0.1, 'eval_every': 1000, 'checkpoint_every': 1000})
  if scale == 'cpu':
    return base.task_config(
        task='stdlib_lm', attention=attention, scale=scale, seq_len=256,
        model={'emb_dim': 128, 'qkv_dim': 128, 'mlp_dim': 512, 'pooling': 'none'},
        train={'steps': 1500, 'learning_rate': 0.05, 'warmup_steps': 300,
               'weight_decay': 0.1, 'eval_every': 500, 'eval_batches': 16})
  return base.task_config(task='stdlib_lm', attention=attention, scale=scale, seq_len=32,
                          model={**base.TINY_MODEL, 'pooling': 'none'},
                          data=base.TINY_DATA, train=base.TINY_TRAIN)
