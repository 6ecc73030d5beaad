"""Image-quality metrics for text-to-image runs, all measured by small conv nets trained in-project on the real
training images: FID and KID in the feature space of one net, caption fidelity by a second, independent one, and
the diversity of images generated for one caption.

Why in-project nets: Inception features do not suit 8-64 pixel synthetic images (and its weights are a download).

Feature space. FID and KID read the penultimate layer of `FeatureNet`, trained as the attribute classifier on the
real training images: for scenes it predicts the layout and shape / colour / size / count of each group
(`scenes.py`), for the shapes pairs the layout and shape / colour / size of each object; for captioned photos, which
caption words are present. Its features therefore see what the captions talk about. There is one such net per
training set, not per run: it is trained on the CPU from a fixed seed (not the run's), and cached under
data.cache_dir by a content hash of everything that determines it (the training images and labels, the architecture
and the training hyper-parameters; `load_or_train_net`), so every run on the same data measures in the same space
and a changed training set can never reuse a stale net.

FID (Heusel et al., 2017): with (mu, S) the mean and covariance of each feature set,
    FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)),
computed in float64 with Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)): both factors are symmetric
positive semi-definite, so two eigen-decompositions (torch.linalg.eigh) replace scipy's sqrtm. FID is biased
upwards by an amount that falls with the sample sizes, so an FID means little without the FID of real images
at the same sizes beside it (the floor; `cosformer.train.tasks.t2i` reports it).

KID (Binkowski et al., 2018): the squared maximum mean discrepancy with the polynomial kernel
k(x, y) = (x.y / f + 1)^3 (f = feature dim), by its unbiased estimator
    MMD^2 = sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (n (n-1)) - 2 sum_{i,j} k(x_i, y_j) / (m n),
averaged over random subsets, with its std over them. Unbiased: two samples of one distribution give 0 in
expectation at any sample size, which FID does not.

Caption fidelity: the (balanced) accuracy with which `AttributeClassifier` recovers the captioned attributes from
generated images (labels of attributes the caption does not name are IGNORE = -1 and skipped). It is a different
architecture from FeatureNet with its own seed, trained separately: a judge that shares FID's network would share its
blind spots. Its accuracy on real images of the same captions is the ceiling a generator can reach.

Diversity: fidelity and FID can both look fine for a generator that draws one image per caption (mode collapse
per caption). `mean_pairwise_distance` over images generated for one caption, relative to the same for real images
of one caption, is near 1 for a generator that varies what the caption leaves open and 0 for one that does not;
`distinct_fraction` counts distinct images per caption.

Standard Inception FID through torchmetrics is opt-in (t2i.inception_fid): its weights are a download, asked for
once when the run starts, so an offline machine fails at once instead of at every evaluation.
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

KID_SUBSETS = 50  # subsets of half the smaller set each, so that both sets vary between subsets
NET_FORMAT = 1  # part of every net's cache key: raise it when `train_net` or an architecture changes


def _to_float(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (b, 3, H, W); got shape {tuple(images.shape)}")
    return images.float() / 255.0 - 0.5 if images.dtype == torch.uint8 else images.float()


class FeatureNet(nn.Module):
    """Conv net on (b, 3, S, S) uint8 images: `features` (b, feature_dim) for FID / KID, `forward` per-attribute logits.

    The last conv map is pooled to a fixed 4x4 grid (not globally) so that features keep where things are: the
    relation between two objects is a question of position.
    """

    def __init__(self, classes: dict[str, int], width: int = 24, feature_dim: int = 128):
        super().__init__()
        _check_classes(classes)
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
        x = F.adaptive_avg_pool2d(self.convs(_to_float(images)), 4).flatten(1)  # (b, 4w * 16)
        return F.gelu(self.project(x))  # (b, feature_dim)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Logits per attribute, in `classes` order: a list of (b, classes[name])."""
        return list(self.heads(self.features(images)).split(list(self.classes.values()), dim=-1))


class AttributeClassifier(nn.Module):
    """The caption-fidelity judge, independent of FeatureNet by construction: two coordinate channels beside RGB
    (position is given, not inferred from padding), 5x5 then 3x3 convs with GroupNorm and max pooling instead of
    strided 3x3 convs with BatchNorm, and an MLP head instead of a linear one on a feature layer."""

    def __init__(self, classes: dict[str, int], width: int = 32, hidden: int = 256):
        super().__init__()
        _check_classes(classes)
        self.classes = dict(classes)
        self.convs = nn.Sequential(
            nn.Conv2d(5, width, 5, padding=2),
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.SiLU(),
            nn.AdaptiveMaxPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.SiLU(), nn.Linear(hidden, sum(self.classes.values()))
        )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Logits per attribute, in `classes` order: a list of (b, classes[name])."""
        x = _to_float(images)
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device)[:, None].expand(h, w)
        xs = torch.linspace(-1, 1, w, device=x.device)[None, :].expand(h, w)
        x = torch.cat([x, torch.stack([ys, xs]).expand(b, 2, h, w)], dim=1)  # (b, 5, h, w)
        return list(self.head(self.convs(x)).split(list(self.classes.values()), dim=-1))


# kind -> (class, architecture kwargs, training hyper-parameters). The seeds are fixed and differ between the two;
# every entry is part of the cache key, so changing one trains a new net.
NETS: dict[str, tuple[type[nn.Module], dict, dict]] = {
    "feature": (
        FeatureNet,
        {"width": 24, "feature_dim": 128},
        {"steps": 350, "batch_size": 128, "lr": 3e-3, "seed": 0},
    ),
    "fidelity": (
        AttributeClassifier,
        {"width": 32, "hidden": 256},
        # counting and binding attributes to the top / left group need more steps than the pairs did: on 32x32 scenes
        # (8000 training images, one seed) balanced accuracy on 400 real test scenes rose from 0.88 at 350 steps to
        # 0.95 at 1200
        {"steps": 1500, "batch_size": 128, "lr": 3e-3, "seed": 1},
    ),
}


def _check_classes(classes: dict[str, int]):
    if not classes or any(c < 2 for c in classes.values()):
        raise ValueError(f"classes must map each attribute to at least 2 classes; got {classes}")


def _check_labels(images: torch.Tensor, labels: torch.Tensor, classes: dict[str, int]):
    if labels.dim() != 2 or labels.shape != (images.shape[0], len(classes)):
        raise ValueError(
            f"labels must be (n, {len(classes)}) for images {tuple(images.shape)} and attributes {list(classes)}; "
            f"got {tuple(labels.shape)}"
        )


def _spec(kind: str, classes: dict[str, int], overrides: dict) -> tuple[type[nn.Module], dict, dict]:
    if kind not in NETS:
        raise ValueError(f"kind must be one of {sorted(NETS)}; got {kind!r}")
    cls, arch, train = NETS[kind]
    unknown = set(overrides) - set(arch) - set(train)
    if unknown:
        raise TypeError(f"unknown options for the {kind} net: {sorted(unknown)}; known: {sorted(arch | train)}")
    arch = {k: overrides.get(k, v) for k, v in arch.items()}
    train = {k: overrides.get(k, v) for k, v in train.items()}
    return cls, arch, train


def train_net(kind: str, images: torch.Tensor, labels: torch.Tensor, classes: dict[str, int], **overrides) -> nn.Module:
    """Train the `kind` net ("feature" or "fidelity", see NETS; options override its entries) as the attribute
    classifier on real images (b, 3, S, S) uint8 with labels (b, A), on the CPU.

    The CPU makes the net a function of its inputs alone, not of the accelerator a run happens to use. Runs under a
    forked RNG so that training it never disturbs the caller's random stream (a resumed run must continue exactly
    as the original would have).
    """
    _check_labels(images, labels, classes)
    cls, arch, train = _spec(kind, classes, overrides)
    steps, batch_size, lr, seed = train["steps"], train["batch_size"], train["lr"], train["seed"]
    with fork_rng("cpu"):
        torch.manual_seed(seed)
        net = cls(classes, **arch)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(steps):
            idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=gen)
            logits = net(images[idx])
            y = labels[idx]
            losses = [F.cross_entropy(lg, y[:, a], ignore_index=IGNORE) for a, lg in enumerate(logits)]
            # An attribute absent from the whole batch gives a NaN mean; it simply contributes nothing.
            loss = torch.stack([l for l in losses if not torch.isnan(l)]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


def net_identity(
    kind: str, images: torch.Tensor, labels: torch.Tensor, classes: dict[str, int], **overrides
) -> tuple[str, dict]:
    """(content hash, description) of the `kind` net these inputs train: sha256 over NET_FORMAT, the architecture,
    the training hyper-parameters, the attribute classes and the bytes (with shapes and dtypes) of the images and
    labels."""
    cls, arch, train = _spec(kind, classes, overrides)
    description = {"format": NET_FORMAT, "kind": kind, "class": cls.__name__, "arch": arch, "train": train}
    description["classes"] = classes
    h = hashlib.sha256(json.dumps(description, sort_keys=True).encode())
    for t in (images, labels):
        h.update(f"{tuple(t.shape)} {t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest(), description


def load_or_train_net(
    kind: str,
    cache_dir: str | os.PathLike,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: dict[str, int],
    **overrides,
) -> nn.Module:
    """The `kind` net for these training images and labels: from the cache when one with the same content hash
    (`net_identity`) is there, else trained (`train_net`) and stored. On the CPU; `.to(device)` it as needed."""
    from safetensors.torch import load_file, save_file

    digest, description = net_identity(kind, images, labels, classes, **overrides)
    cls, arch, _ = _spec(kind, classes, overrides)
    path = pathlib.Path(cache_dir).expanduser() / f"t2i_{kind}net_{digest[:20]}.safetensors"
    if path.exists():
        net = cls(classes, **arch)
        net.load_state_dict(load_file(str(path)))
        log.info("%s net %s read from %s", kind, digest[:12], path)
        return net.eval().requires_grad_(False)
    net = train_net(kind, images, labels, classes, **overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    meta = {"sha256": digest, "description": json.dumps(description, sort_keys=True)}
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    log.info("%s net %s trained and stored in %s", kind, digest[:12], path)
    return net


@torch.no_grad()
def _batched(net: nn.Module, fn, images: torch.Tensor, batch_size: int = 512):
    device = next(net.parameters()).device
    return [fn(images[s : s + batch_size].to(device)) for s in range(0, len(images), batch_size)]


def extract_features(net: FeatureNet, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(n, feature_dim) float64 features of (n, 3, S, S) uint8 images."""
    return torch.cat(_batched(net, net.features, images, batch_size)).double().cpu()


def predict(net: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(n, A) long: the predicted class of every attribute."""
    chunks = _batched(net, lambda x: torch.stack([lg.argmax(-1) for lg in net(x)], dim=1), images, batch_size)
    return torch.cat(chunks).cpu()


def caption_fidelity(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, balanced: bool = True) -> float:
    """Fraction of captioned attributes (labels != IGNORE) the classifier `net` recovers from images.

    balanced=True (the default) averages the per-class recall within each attribute first, then over attributes:
    where classes are uneven (one object vs two; "the caption mentions 'dog'"), plain accuracy rewards predicting
    the majority class everywhere, which a generator that draws one image for every caption would get for free.
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


def _check_feature_pair(features_1: torch.Tensor, features_2: torch.Tensor):
    for name, f in (("features_1", features_1), ("features_2", features_2)):
        if f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must be (n, f) with n >= 2; got shape {tuple(f.shape)}")
    if features_1.shape[1] != features_2.shape[1]:
        raise ValueError(f"feature dims differ: {tuple(features_1.shape)} vs {tuple(features_2.shape)}")


def frechet_distance(features_1: torch.Tensor, features_2: torch.Tensor) -> float:
    """FID between two feature sets (n1, f) and (n2, f), in float64 (see module docstring)."""
    _check_feature_pair(features_1, features_2)
    f1, f2 = features_1.double(), features_2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    evals, evecs = torch.linalg.eigh(s1)
    sqrt_s1 = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
    middle = sqrt_s1 @ s2 @ sqrt_s1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt).item()


def polynomial_mmd2(features_1: torch.Tensor, features_2: torch.Tensor) -> float:
    """Unbiased MMD^2 between (m, f) and (n, f) with the kernel (x.y / f + 1)^3, in float64 (module docstring)."""
    _check_feature_pair(features_1, features_2)
    x, y = features_1.double(), features_2.double()
    m, n, dim = len(x), len(y), x.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T / dim + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return (within_x + within_y - 2 * k_xy.mean()).item()


def kernel_inception_distance(
    features_1: torch.Tensor, features_2: torch.Tensor, subsets: int = KID_SUBSETS, seed: int = 0
) -> tuple[float, float]:
    """KID as (mean, std) of `polynomial_mmd2` over `subsets` subsets: each draws half the smaller set's size from
    each set, without replacement (torch.randperm from a generator seeded with `seed`: reproducible)."""
    _check_feature_pair(features_1, features_2)
    if subsets < 2:
        raise ValueError(f"subsets must be >= 2 for a std; got {subsets}")
    n1, n2 = len(features_1), len(features_2)
    size = max(2, min(n1, n2) // 2)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        rows_1, rows_2 = torch.randperm(n1, generator=gen)[:size], torch.randperm(n2, generator=gen)[:size]
        values.append(polynomial_mmd2(features_1[rows_1], features_2[rows_2]))
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), values.std().item()


def mean_pairwise_distance(groups: list[torch.Tensor]) -> float:
    """Mean Euclidean distance between two members of one group (pairs i < j), averaged over the groups of at least
    two (n_g, f) members: the spread of what was drawn for one caption."""
    spreads = [torch.pdist(g.double()).mean() for g in groups if len(g) >= 2]
    if not spreads:
        raise ValueError("mean_pairwise_distance needs a group of at least two members")
    return torch.stack(spreads).mean().item()


def distinct_fraction(groups: list[torch.Tensor]) -> float:
    """Mean over groups of (number of distinct images) / (group size), for groups of (n_g, 3, S, S) images."""
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("distinct_fraction needs non-empty groups")
    return sum(len(torch.unique(g.flatten(1), dim=0)) / len(g) for g in groups) / len(groups)


def inception_fid_metric():
    """torchmetrics' FrechetInceptionDistance (2048 features), built once: the first build fetches the Inception
    weights into torch hub's cache. Raises RuntimeError naming the cause when torchmetrics or its weights cannot be had
    here (offline, the fetch fails or waits on the network's timeout: so it is asked for once, never per evaluation)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=2048)
    except Exception as err:  # ImportError, or the weights cannot be fetched
        raise RuntimeError(
            f"Inception FID needs torchmetrics and its Inception weights: {type(err).__name__}: {err}"
        ) from err


def inception_fid(metric, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Standard Inception FID of uint8 images (n, 3, S, S) through `metric` (from `inception_fid_metric`), reset first
    and run on the images' device."""
    metric.reset()
    metric.to(real.device)
    # Inception wants at least 75 pixels a side; nearest upsampling keeps the palette's hard edges.
    size = max(real.shape[-1], 299)
    for images, is_real in ((real, True), (fake, False)):
        metric.update(F.interpolate(images.float(), size=size, mode="nearest").to(torch.uint8), real=is_real)
    return float(metric.compute())
