"""Each mechanism's math as a pure function, its random state an explicit argument.

For users of other JAX libraries (Equinox, Haiku, Linen, plain `jax`): no
module, no hidden state, so every function works under `jit`, `grad`, `vmap`,
`pmap` and sharding. The same functions are what the NNX modules call.

    import efficient_attn.functional as F
    features = F.draw_orthogonal_features(key, 256, head_dim)   # Performer
    y = F.favor_attention(q, k, v, features, mask=mask)
    rotations = F.draw_rotations(key, heads, n_hashes=2, head_dim=head_dim, n_buckets=64)
    y = F.lsh_attention(q, k, v, rotations, causal=True, chunk_len=64)   # Reformer

Layout everywhere: q `[batch, q_len, heads, head_dim]`, k and v `[batch, kv_len,
heads, dim]`, mask None or bool `[batch, kv_len]` (True for real keys).
"""

from efficient_attn.attention.blocked import blocked_attention
from efficient_attn.attention.full import dense_attention, xla_attention
from efficient_attn.attention.linformer import linformer_attention
from efficient_attn.attention.longformer import sliding_window_attention
from efficient_attn.attention.lsh import default_n_buckets, draw_rotations, lsh_attention
from efficient_attn.attention.performer import draw_orthogonal_features, favor_attention

__all__ = [
    'blocked_attention', 'dense_attention', 'xla_attention', 'linformer_attention',
    'sliding_window_attention', 'default_n_buckets', 'draw_rotations', 'lsh_attention',
    'draw_orthogonal_features', 'favor_attention',
]
