"""Text (LRA): IMDB sentiment at byte level, 2 classes.

  python launch.py --config configs/text.py:full,cpu --workdir runs/text-full-cpu

paper: the public LRA code's base config (4 layers, emb 256, 1000 bytes, 20000
steps; Transformer 64.27% test accuracy, LRA Table 1); cpu: 512 bytes, 2 layers
of width 64. Needs the IMDB reviews (see `python -m efficient_attn.data.prepare status`).
(The cpu scale is not measured here: the data cannot be downloaded on this machine.)
"""

from configs import base


def get_config(arg: str | None = None):
  """The Text config for arg 'attention[,scale]' (default 'full,cpu')."""
  attention, scale = base.parse_arg(arg)
  return base.byte_task_config(
      'text', attention, scale, paper_seq_len=1000,
      paper_model={'num_layers': 4, 'emb_dim': 256, 'num_heads': 4, 'qkv_dim': 256,
                   'mlp_dim': 1024},
      paper_steps=20000)
