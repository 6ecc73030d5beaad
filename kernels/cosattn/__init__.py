"""cosattn: fused cosine-similarity attention (l2-normalised q, k; fixed scale) in Triton."""

from .interface import cosine_sim_attention
from .reference import attention_reference, l2norm_tensors

__all__ = ["cosine_sim_attention", "l2norm_tensors", "attention_reference"]
__version__ = "0.1.0"
