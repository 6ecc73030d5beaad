"""cosformer: transformers whose attention is fixed-scale cosine similarity, computed by fused Triton kernels.

Vocabulary of x-transformers: `TransformerWrapper(num_tokens, max_seq_len, attn_layers=Decoder(dim, depth, heads))`,
`AutoregressiveWrapper(net)` for the loss and `.generate`, `XTransformer` for encoder-decoder models,
`ContinuousTransformerWrapper` for sequences of vectors; `from_x_transformers(model)` loads an x-transformers model's
weights into the equivalent cosformer model.
"""

from cosattn import cosine_sim_attention, cosine_sim_attention_varlen, l2norm_tensors

from .compiling import compile_in_place, compile_kwargs, compile_model
from .continuous import ContinuousTransformerWrapper
from .convert import from_x_transformers
from .transformer import CrossAttender, Decoder, Encoder, KVCache, LayerIntermediates, Transformer
from .wrappers import AutoregressiveWrapper, TransformerWrapper, XTransformer

__version__ = "0.1.0"

__all__ = [
    "cosine_sim_attention",
    "cosine_sim_attention_varlen",
    "l2norm_tensors",
    "Transformer",
    "Encoder",
    "Decoder",
    "CrossAttender",
    "KVCache",
    "LayerIntermediates",
    "TransformerWrapper",
    "ContinuousTransformerWrapper",
    "AutoregressiveWrapper",
    "XTransformer",
    "compile_model",
    "compile_in_place",
    "compile_kwargs",
    "from_x_transformers",
    "__version__",
]
