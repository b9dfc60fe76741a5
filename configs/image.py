"""Image (LRA): CIFAR-10 as 1024 grayscale pixels, 10 classes.

  python launch.py --config configs/image.py:full,cpu --workdir runs/image-full-cpu

paper: the public LRA code's transformer config (1 layer, emb 128, 8 heads of
qkv 64, mlp 128, dropout 0.3, learned positions, 35000 steps of batch 256, cosine
learning rate 5e-4; Transformer 42.44% test accuracy, LRA Table 1); cpu: the
same model, 3000 steps of batch 64. Needs CIFAR-10 (see `prepare status`).
(The cpu scale is not measured here: the data cannot be downloaded on this machine.)
"""

from configs import base

PAPER_MODEL = {'num_layers': 1, 'emb_dim': 128, 'num_heads': 8, 'qkv_dim': 64, 'mlp_dim': 128,
               'dropout_rate': 0.3, 'attention_dropout_rate': 0.2,
               'pos_encoding': 'learned'}


def get_config(arg: str | None = None):
  """The Image config for arg 'attention[,scale]' (default 'full,cpu')."""
  attention, scale = base.parse_arg(arg)
  if scale == 'paper':
    return base.task_config(
        task='image', attention=attention, scale=scale, seq_len=1024, model=PAPER_MODEL,
        data={'batch_size': 256},
        train={'steps': 35000, 'learning_rate': 5e-4, 'schedule': 'cosine',
               'warmup_steps': 175, 'grad_clip': 0.0, 'eval_every': 175,
               'checkpoint_every': 1750})
  if scale == 'cpu':
    return base.task_config(
        task='image', attention=attention, scale=scale, seq_len=1024, model=PAPER_MODEL,
        data={'batch_size': 64},
        train={'steps': 3000, 'learning_rate': 1e-3, 'schedule': 'cosine',
               'warmup_steps': 175, 'eval_every': 500, 'eval_batches': 32})
  return base.task_config(task='image', attention=attention, scale=scale, seq_len=1024,
                          model={**base.TINY_MODEL, 'pos_encoding': 'learned'},
                          data=base.TINY_DATA, train=base.TINY_TRAIN)
