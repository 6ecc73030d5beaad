"""Image-quality metrics for text-to-image runs: FID in an in-project feature space, and caption fidelity.

Feature space. Inception features do not suit 8-32 pixel synthetic images (and its weights are a download), so
FID is measured in the penultimate layer of a small conv net (`FeatureNet`) trained in-project, once per
(dataset, seed, image_size), as the attribute classifier on the real training images: for the shapes dataset it
predicts layout, and shape / colour / size of each object; for captioned photos, which caption words are present.
Its features therefore see exactly what the captions talk about. It trains in well under a minute on a CPU at the
default sizes and is cached under data.cache_dir as safetensors (`load_or_train_feature_net`).

FID (Heusel et al., 2017): with (mu, S) the mean and covariance of each feature set,
    FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)),
computed in float64 with Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)): both factors are symmetric
positive semi-definite, so two eigen-decompositions (torch.linalg.eigh) replace scipy's sqrtm.

Caption fidelity: the accuracy with which the same classifier, trained on real images, recovers the captioned
attributes from generated images (labels of attributes the caption does not name are IGNORE = -1 and skipped).

Standard Inception FID is added through torchmetrics when it and its weights are available; otherwise it is
skipped with one log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

from cosformer.train.rng import fork_rng

from .shapes import IGNORE

log = logging.getLogger(__name__)


class FeatureNet(nn.Module):
    """Conv net on (b, 3, S, S) uint8 images: `features` (b, feature_dim) for FID, `forward` per-attribute logits.

    The last conv map is pooled to a fixed 4x4 grid (not globally) so that features keep where things are: the
    relation between two objects is a question of position.
    """

    def __init__(self, classes: dict[str, int], width: int = 24, feature_dim: int = 128):
        super().__init__()
        if not classes or any(c < 2 for c in classes.values()):
            raise ValueError(f"classes must map each attribute to at least 2 classes; got {classes}")
        self.classes = dict(classes)
        # BatchNorm makes the few hundred steps the cache budget allows enough to tell small shapes apart.
        self.convs = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(4 * width),
            nn.GELU(),
        )
        self.project = nn.Linear(4 * width * 16, feature_dim)
        self.heads = nn.Linear(feature_dim, sum(self.classes.values()))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (b, 3, H, W); got shape {tuple(images.shape)}")
        x = images.float() / 255.0 - 0.5 if images.dtype == torch.uint8 else images.float()
        x = F.adaptive_avg_pool2d(self.convs(x), 4).flatten(1)  # (b, 4w * 16)
        return F.gelu(self.project(x))  # (b, feature_dim)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Logits per attribute, in `classes` order: a list of (b, classes[name])."""
        return list(self.heads(self.features(images)).split(list(self.classes.values()), dim=-1))


def _check_labels(images: torch.Tensor, labels: torch.Tensor, classes: dict[str, int]):
    if labels.dim() != 2 or labels.shape != (images.shape[0], len(classes)):
        raise ValueError(
            f"labels must be (n, {len(classes)}) for images {tuple(images.shape)} and attributes {list(classes)}; "
            f"got {tuple(labels.shape)}"
        )


def train_feature_net(
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: dict[str, int],
    *,
    steps: int = 350,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> FeatureNet:
    """Train a FeatureNet as the attribute classifier on real images (b, 3, S, S) uint8 with labels (b, A).

    Runs under a forked RNG so that training it never disturbs the caller's random stream (a resumed run must
    continue exactly as the original would have).
    """
    _check_labels(images, labels, classes)
    device = torch.device(device)
    with fork_rng(device):
        torch.manual_seed(seed)
        net = FeatureNet(classes).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(steps):
            idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=gen)
            x, y = images[idx].to(device), labels[idx].to(device)
            logits = net(x)
            losses = [F.cross_entropy(lg, y[:, a], ignore_index=IGNORE) for a, lg in enumerate(logits)]
            # An attribute absent from the whole batch gives a NaN mean; it simply contributes nothing.
            loss = torch.stack([l for l in losses if not torch.isnan(l)]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def _batched(net: FeatureNet, fn, images: torch.Tensor, batch_size: int = 512):
    device = next(net.parameters()).device
    return [fn(images[s : s + batch_size].to(device)) for s in range(0, len(images), batch_size)]


def extract_features(net: FeatureNet, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(n, feature_dim) float64 features of (n, 3, S, S) uint8 images."""
    return torch.cat(_batched(net, net.features, images, batch_size)).double().cpu()


def predict(net: FeatureNet, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(n, A) long: the predicted class of every attribute."""
    chunks = _batched(net, lambda x: torch.stack([lg.argmax(-1) for lg in net(x)], dim=1), images, batch_size)
    return torch.cat(chunks).cpu()


def caption_fidelity(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, balanced: bool = False) -> float:
    """Fraction of captioned attributes (labels != IGNORE) the classifier recovers from images.

    balanced=True averages the per-class recall within each attribute first, then over attributes: for binary
    attributes such as "the caption mentions 'dog'" whose classes are far from even, plain accuracy would reward
    predicting "absent" everywhere.
    """
    _check_labels(images, labels, net.classes)
    pred, named = predict(net, images), labels != IGNORE
    if not named.any():
        raise ValueError("labels name no attribute (all IGNORE): fidelity is undefined")
    if not balanced:
        return ((pred == labels) & named).sum().item() / named.sum().item()
    scores = []
    for a in range(labels.shape[1]):
        y, p = labels[named[:, a], a], pred[named[:, a], a]
        recalls = [(p[y == c] == c).float().mean() for c in y.unique()]
        if recalls:
            scores.append(torch.stack(recalls).mean())
    return torch.stack(scores).mean().item()


def frechet_distance(features_1: torch.Tensor, features_2: torch.Tensor) -> float:
    """FID between two feature sets (n1, f) and (n2, f), in float64 (see module docstring)."""
    for name, f in (("features_1", features_1), ("features_2", features_2)):
        if f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must be (n, f) with n >= 2; got shape {tuple(f.shape)}")
    if features_1.shape[1] != features_2.shape[1]:
        raise ValueError(f"feature dims differ: {tuple(features_1.shape)} vs {tuple(features_2.shape)}")
    f1, f2 = features_1.double(), features_2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    evals, evecs = torch.linalg.eigh(s1)
    sqrt_s1 = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
    middle = sqrt_s1 @ s2 @ sqrt_s1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt).item()


def feature_net_path(cache_dir: str | os.PathLike, key: str) -> pathlib.Path:
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return pathlib.Path(cache_dir) / f"t2i_featnet_{digest}.safetensors"


def load_or_train_feature_net(
    cache_dir: str | os.PathLike,
    key: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: dict[str, int],
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    **train_kwargs,
) -> FeatureNet:
    """The feature net for `key` (which must name dataset, seed and image size): from the cache, else trained."""
    from safetensors.torch import load_file, save_file

    path = feature_net_path(cache_dir, key)
    meta = {"key": key, "classes": json.dumps(classes)}
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
        if stored.get("key") == key and json.loads(stored.get("classes", "{}")) == classes:
            net = FeatureNet(classes)
            net.load_state_dict(load_file(str(path)))
            return net.to(device).eval().requires_grad_(False)
        log.warning("feature net cache %s was made for another dataset; retraining", path)
    net = train_feature_net(images, labels, classes, seed=seed, device=device, **train_kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return net


_inception_unavailable_logged = False


def inception_fid(real: torch.Tensor, fake: torch.Tensor) -> float | None:
    """Standard Inception FID through torchmetrics, or None (said once in the log) when it cannot run here."""
    global _inception_unavailable_logged
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048).to(real.device)
        # Inception wants at least 75 pixels a side; nearest upsampling keeps the palette's hard edges.
        size = max(real.shape[-1], 299)
        for images, is_real in ((real, True), (fake, False)):
            fid.update(F.interpolate(images.float(), size=size, mode="nearest").to(torch.uint8), real=is_real)
        return float(fid.compute())
    except Exception as err:  # ImportError, or the weights cannot be fetched offline
        if not _inception_unavailable_logged:
            log.warning("Inception FID skipped (torchmetrics or its weights unavailable: %s)", type(err).__name__)
            _inception_unavailable_logged = True
        return None
