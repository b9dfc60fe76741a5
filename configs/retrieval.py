"""Retrieval (LRA): does one AAN paper cite the other, byte level, a dual encoder.

  python launch.py --config configs/retrieval.py:full,cpu --workdir runs/retrieval-full-cpu

paper: the public LRA code's base config (4 layers, emb 128, 4000 bytes per
document, 5000 steps; Transformer 57.46% test accuracy, LRA Table 1); cpu: 512
bytes per document, 2 layers of width 64. Needs LRA's files (lra_release).
(The cpu scale is not measured here: the data cannot be downloaded on this machine.)
"""

from configs import base


def get_config(arg: str | None = None):
  """The Retrieval config for arg 'attention[,scale]' (default 'full,cpu')."""
  attention, scale = base.parse_arg(arg)
  return base.byte_task_config(
      'retrieval', attention, scale, paper_seq_len=4000,
      paper_model={'num_layers': 4, 'emb_dim': 128, 'num_heads': 4, 'qkv_dim': 128,
                   'mlp_dim': 512},
      paper_steps=5000)
