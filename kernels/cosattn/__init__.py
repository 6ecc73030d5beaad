"""cosattn: fused cosine-similarity attention (l2-normalised q, k; fixed scale) in Triton."""

from .interface import (
    MAX_HEAD_DIM,
    MAX_SCALE,
    MIN_HEAD_DIM,
    check_attention_config,
    cosine_sim_attention,
    cosine_sim_attention_varlen,
)
from .reference import attention_reference, l2norm_tensors

__all__ = [
    "cosine_sim_attention",
    "cosine_sim_attention_varlen",
    "check_attention_config",
    "MIN_HEAD_DIM",
    "MAX_HEAD_DIM",
    "MAX_SCALE",
    "l2norm_tensors",
    "attention_reference",
]
__version__ = "0.1.0"
