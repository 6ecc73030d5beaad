"""Text-to-image experiments: data (procedural shapes, Hugging Face image-caption sets), the model (caption
encoder + autoregressive palette-token decoder), image-quality metrics (in-project FID, caption fidelity) and
sample grids. The training task that ties them to the trainer is `cosformer.train.tasks.t2i`."""

from .grid import save_grid
from .hf import load_hf_splits
from .metrics import (
    FeatureNet,
    caption_fidelity,
    extract_features,
    frechet_distance,
    inception_fid,
    load_or_train_feature_net,
    train_feature_net,
)
from .model import TextToImage
from .shapes import ImageCaptionDataset, ShapesDataset, decode_caption, encode_captions

__all__ = [
    "FeatureNet",
    "ImageCaptionDataset",
    "ShapesDataset",
    "TextToImage",
    "caption_fidelity",
    "decode_caption",
    "encode_captions",
    "extract_features",
    "frechet_distance",
    "inception_fid",
    "load_hf_splits",
    "load_or_train_feature_net",
    "save_grid",
    "train_feature_net",
]
