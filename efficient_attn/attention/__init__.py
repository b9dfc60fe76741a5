"""Attention mechanisms behind one interface; importing this registers them all."""

from efficient_attn.attention.base import (Attention, RandomAttention, attention_class,
                                           available_attentions, make_attention,
                                           register_attention)
from efficient_attn.attention.full import FullAttention, dense_attention
from efficient_attn.attention.blocked import blocked_attention
from efficient_attn.attention import lsh, linformer, performer, longformer, sinkhorn, \
    routing, bigbird, linear, synthesizer, local, sparse
