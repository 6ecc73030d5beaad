"""Text-to-image as autoregressive modelling of palette tokens, conditioned on an encoded caption.

    caption bytes (b, L) --Encoder (self-attention, key-padding mask)--> context (b, L, dim)
    [BOS, p_1, ..., p_{S*S}] --Decoder (causal self-attention + cross-attention to context, caption mask)--> logits

Every pixel is one token: its index in a small palette (the scenes and shapes datasets are drawn from the palette, so
this is lossless there), in raster order after a BOS token (id = number of colours); a 64x64 scene is 4096 tokens
(`scenes.py` says why no patch tokeniser sits in between). Why autoregressive over discrete tokens: the loss is an
exact likelihood (bits per pixel), the zoo's `AutoregressiveWrapper` and its KV-cached generation serve as they are,
and the cross-attention exercises the attention op's key-padding mask on every layer. Every attention of both stacks
is of one kind (`attn="cosine"` or `"regular"`), so the two variants differ in nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..transformer import Decoder, Encoder
from ..wrappers import WRAPPER_KEYS, AutoregressiveWrapper, TransformerWrapper

NUM_TEXT_TOKENS = 256  # bytes


class TextToImage(nn.Module):
    """Caption encoder + autoregressive image decoder.

    palette: (P, 3) uint8 RGB colours; image tokens are 0..P-1 and BOS = P. layer_kwargs (attn, scale, groups,
    pre_norm, dim_head, kv_heads, ff_mult, ff_glu, dropout, rotary, ...) go to both stacks; wrapper options
    (tie_embedding, use_abs_pos_emb, emb_dropout) to both wrappers.
    """

    def __init__(
        self,
        palette: torch.Tensor,
        *,
        image_size: int,
        text_max_len: int,
        dim: int,
        depth: int,
        heads: int,
        enc_depth: int = 2,
        **layer_kwargs,
    ):
        super().__init__()
        if palette.dim() != 2 or palette.shape[1] != 3 or palette.shape[0] < 2 or palette.dtype != torch.uint8:
            raise ValueError(f"palette must be (P >= 2, 3) uint8; got {tuple(palette.shape)} {palette.dtype}")
        if image_size < 1 or text_max_len < 1:
            raise ValueError(f"image_size and text_max_len must be positive; got {image_size}, {text_max_len}")
        wrapper_kwargs = {k: layer_kwargs.pop(k) for k in WRAPPER_KEYS if k in layer_kwargs}
        self.image_size, self.text_max_len = image_size, text_max_len
        self.num_colours = palette.shape[0]
        self.bos = self.num_colours
        self.register_buffer("palette", palette.clone())
        # The encoder's logits are never computed: tying removes a head that would get no gradient (which DDP
        # rejects as an unused parameter).
        self.encoder = TransformerWrapper(
            NUM_TEXT_TOKENS,
            text_max_len,
            Encoder(dim, enc_depth, heads, **layer_kwargs),
            **(wrapper_kwargs | {"tie_embedding": True}),
        )
        self.decoder = AutoregressiveWrapper(
            TransformerWrapper(
                self.num_colours + 1,
                image_size**2 + 1,
                Decoder(dim, depth, heads, cross_attend=True, **layer_kwargs),
                **wrapper_kwargs,
            )
        )

    def _check(self, text: torch.Tensor, text_mask: torch.Tensor):
        if text.dim() != 2 or text.shape[1] > self.text_max_len or text.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"text must be (b, L <= {self.text_max_len}) integer byte ids; got {tuple(text.shape)} {text.dtype}"
            )
        if text_mask.dtype != torch.bool or text_mask.shape != text.shape:
            raise ValueError(
                f"text_mask must be a bool tensor shaped like text {tuple(text.shape)}; "
                f"got {tuple(text_mask.shape)} {text_mask.dtype}"
            )

    def encode(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(b, L) bytes and mask -> context (b, L, dim). Padded positions carry values but are never attended."""
        self._check(text, text_mask)
        return self.encoder(text, mask=text_mask, return_embeddings=True)

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """Mean next-token cross-entropy (nats per pixel) of image_tokens (b, S*S + 1) = [BOS, pixels...];
        (b,) per-image means with reduction="none"."""
        n = self.image_size**2 + 1
        if image_tokens.dim() != 2 or image_tokens.shape != (text.shape[0], n):
            raise ValueError(f"image_tokens must be (b={text.shape[0]}, {n}); got {tuple(image_tokens.shape)}")
        context = self.encode(text, text_mask)
        return self.decoder(image_tokens, context=context, context_mask=text_mask, reduction=reduction)

    def tokens_to_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, S*S) palette indices -> (b, 3, S, S) uint8 RGB. A stray BOS (never seen as a target) becomes colour 0."""
        tokens = tokens.masked_fill(tokens >= self.num_colours, 0)
        rgb = self.palette[tokens.reshape(-1, self.image_size, self.image_size)]  # (b, S, S, 3)
        return rgb.permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def generate(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        temperature: float = 1.0,
        filter_logits_fn: str | Callable | None = None,
        filter_kwargs: dict | None = None,
        return_tokens: bool = False,
        compile: bool | str = False,
    ) -> torch.Tensor:
        """Sample one image per caption: (b, 3, S, S) uint8 (or the (b, S*S) tokens with return_tokens).

        No logit filter by default: FID compares the model's own distribution with the data's, which top-k would
        sharpen. The KV cache makes each step cost one token per layer; compile=True replays the steps as CUDA
        graphs (`AutoregressiveWrapper.generate`'s compile).
        """
        was_training = self.training
        self.eval()
        context = self.encode(text, text_mask)
        bos = torch.full((text.shape[0], 1), self.bos, dtype=torch.long, device=text.device)
        tokens = self.decoder.generate(
            bos,
            self.image_size**2,
            temperature=temperature,
            filter_logits_fn=filter_logits_fn,
            filter_kwargs=filter_kwargs,
            cache_kv=True,
            compile=compile,
            context=context,
            context_mask=text_mask,
        )
        self.train(was_training)
        return tokens if return_tokens else self.tokens_to_images(tokens)
