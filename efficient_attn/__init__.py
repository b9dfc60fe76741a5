"""efficient_attn: efficient attention mechanisms for JAX/Flax NNX behind one interface."""

__version__ = '0.1.0'

from efficient_attn.attention import (Attention, RandomAttention, attention_class,
                                      available_attentions, blocked_attention, dense_attention,
                                      make_attention, register_attention)
from efficient_attn.layers import FeedForward, MultiHeadAttention, TransformerBlock
from efficient_attn import functional
from efficient_attn.models import Classifier, DualEncoder, LanguageModel, make_model
