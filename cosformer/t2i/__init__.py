"""Text-to-image experiments: data (procedural scenes and shapes, Hugging Face image-caption sets), the model (caption
encoder + autoregressive palette-token decoder), image-quality metrics (in-project FID and KID, caption fidelity
by an independent classifier, diversity) and sample grids. The training task that ties them to the trainer is
`cosformer.train.tasks.t2i`."""

from .grid import save_grid
from .hf import load_hf_splits
from .metrics import (
    AttributeClassifier,
    FeatureNet,
    caption_fidelity,
    distinct_fraction,
    extract_features,
    frechet_distance,
    inception_fid,
    kernel_inception_distance,
    load_or_train_net,
    mean_pairwise_distance,
    train_net,
)
from .model import TextToImage
from .scenes import SceneDataset
from .shapes import ImageCaptionDataset, ShapesDataset, decode_caption, encode_captions

__all__ = [
    "AttributeClassifier",
    "FeatureNet",
    "ImageCaptionDataset",
    "SceneDataset",
    "ShapesDataset",
    "TextToImage",
    "caption_fidelity",
    "decode_caption",
    "distinct_fraction",
    "encode_captions",
    "extract_features",
    "frechet_distance",
    "inception_fid",
    "kernel_inception_distance",
    "load_hf_splits",
    "load_or_train_net",
    "mean_pairwise_distance",
    "save_grid",
    "train_net",
]
