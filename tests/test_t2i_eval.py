"""The text-to-image task's evaluation plumbing, end to end, with stub generators in place of a model.

A generator that returns real images of the split, and a collapsed one that returns one image for every caption, go
through `TextToImageTask.evaluate` / `final_evaluate`; every metric they report is recomputed here from data built
independently of the task (the split drawn again from its seed, the layout written out from its documented rule):
FID and KID against the reference of the right split, the floor over disjoint real subsets, balanced fidelity and
its ceiling, diversity, and the sampling temperature that reaches `generate`."""

import collections
import contextlib
import types

import numpy as np
import pytest
import torch
from accelerate.utils import DistributedType

from cosformer.t2i import metrics
from cosformer.t2i.shapes import IGNORE, ShapesDataset, decode_caption
from cosformer.train.config import load_config
from cosformer.train.tasks import t2i as t2i_task

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = {"train": 160, "val": 20, "test": 16}
N, SUBSETS, CAPTIONS, PER_CAPTION, TEMPERATURE = 5, 4, 3, 4, 0.7


class StubGenerator(torch.nn.Module):
    """`generate` returns real images of `source` (the j-th caption c of a call gets the j-th image of caption c,
    cycling) or, with `collapsed`, that one image for every caption; it records what it was asked and gave."""

    def __init__(self, source=None, collapsed=None):
        super().__init__()
        self.source, self.collapsed = source, collapsed
        self.calls = []  # (captions, temperature, images)
        self.compile = []  # the compile argument of each call

    def generate(self, text, text_mask, temperature=1.0, **kwargs):
        self.compile.append(kwargs.get("compile"))
        captions = [decode_caption(t, m) for t, m in zip(text, text_mask)]
        if self.collapsed is not None:
            images = self.collapsed.expand(len(captions), -1, -1, -1).clone()
        else:
            images_of = collections.defaultdict(list)
            for image, caption in zip(self.source["images"], self.source["captions"]):
                images_of[caption].append(image)
            seen = collections.Counter()
            picked = []
            for caption in captions:
                picked.append(images_of[caption][seen[caption] % len(images_of[caption])])
                seen[caption] += 1
            images = torch.stack(picked)
        self.calls.append((captions, temperature, images))
        return images

    def forward(self, text, text_mask, image_tokens, reduction="mean"):
        loss = torch.zeros(text.shape[0])
        return loss if reduction == "none" else loss.mean()


def _accelerator():
    return types.SimpleNamespace(
        distributed_type=DistributedType.NO,
        is_main_process=True,
        num_processes=1,
        process_index=0,
        device=torch.device("cpu"),
        unwrap_model=lambda m: m,
        autocast=contextlib.nullcontext,
        gather_for_metrics=lambda x: x,
        print=print,
    )


@pytest.fixture
def small_evaluation(monkeypatch):
    """Fewer floor subsets, diversity captions and net training steps than a run uses: the plumbing is the same."""
    monkeypatch.setattr(t2i_task, "FLOOR_SUBSETS", SUBSETS)
    monkeypatch.setattr(t2i_task, "DIVERSITY_CAPTIONS", CAPTIONS)
    monkeypatch.setattr(t2i_task, "DIVERSITY_SAMPLES", PER_CAPTION)
    for kind, (cls, arch, train) in list(metrics.NETS.items()):
        monkeypatch.setitem(metrics.NETS, kind, (cls, arch, train | {"steps": 25, "batch_size": 64}))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: the nets are trained once, as in a sweep of runs on the same data."""
    return tmp_path_factory.mktemp("cache")


def _config(cache, *extra):
    return load_config(
        overrides=[
            "data.name=shapes",
            f"data.cache_dir={cache}",
            "t2i.image_size=8",
            "t2i.palette=5",
            *(f"t2i.num_{split}={n}" for split, n in SIZES.items()),
            f"t2i.fid_samples={N}",
            f"t2i.sample_temperature={TEMPERATURE}",
            "t2i.data_seed=3",
            "train.seed=11",  # not the data seed: the data and the metric nets must not follow it
            "train.batch_size=8",
            "train.max_steps=4",
            *extra,
        ]
    )


def _balanced_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean over attributes of the mean over classes present of the recall, skipping IGNORE labels."""
    per_attribute = []
    for a in range(labels.shape[1]):
        named = labels[:, a] != IGNORE
        y, p = labels[named, a], pred[named, a]
        if len(y):
            per_attribute.append(np.mean([np.mean(p[y == c] == c) for c in np.unique(y)]))
    return float(np.mean(per_attribute))


def _predict(net, images) -> np.ndarray:
    with torch.no_grad():
        return torch.stack([lg.argmax(-1) for lg in net(images)], dim=1).numpy()


def _mean_std(values):
    return np.mean(values), np.std(values, ddof=1)


def _direct_metrics(cache, split: str, fid_images, diversity_images) -> dict:
    """Every image metric from scratch: the split drawn again, nets from the cache by the training set's content."""
    pool = ShapesDataset(split, SIZES[split] + SUBSETS * N, image_size=8, palette=5, seed=3)
    train = ShapesDataset("train", SIZES["train"], image_size=8, palette=5, seed=3)
    nets = {
        kind: metrics.load_or_train_net(kind, cache, train.images(), train.labels(), train.attribute_classes())
        for kind in ("feature", "fidelity")
    }

    def features(images):
        return metrics.extract_features(nets["feature"], images)

    first = SIZES[split]  # the reference is the split itself, the floor subsets the n-image blocks after it
    reference = features(pool.images(slice(0, first)))
    floor_rows = [slice(first + i * N, first + (i + 1) * N) for i in range(SUBSETS)]
    floor = [features(pool.images(rows)) for rows in floor_rows]
    generated = features(fid_images)
    captions = floor_rows[0]
    counts = collections.Counter(pool.captions)
    order = sorted(counts, key=lambda c: (-counts[c], pool.captions.index(c)))[:CAPTIONS]
    real_groups = [[r for r, c in enumerate(pool.captions) if c == caption][:PER_CAPTION] for caption in order]
    repeated = [i for i, g in enumerate(real_groups) if len(g) >= 2]  # only captions with two real images
    real_spread = metrics.mean_pairwise_distance(
        [features(pool.images(torch.tensor(real_groups[i]))) for i in repeated]
    )
    gen_spread = metrics.mean_pairwise_distance([features(diversity_images[i]) for i in repeated])
    fid_floor = _mean_std([metrics.frechet_distance(f, reference) for f in floor])
    kid_floor = _mean_std([metrics.kernel_inception_distance(f, reference)[0] for f in floor])
    kid = metrics.kernel_inception_distance(generated, reference)
    labels = pool.labels(captions).numpy()
    return {
        "captions": pool.captions[captions],
        "diversity_captions": [c for c in order for _ in range(PER_CAPTION)],
        f"{split}_fid": metrics.frechet_distance(generated, reference),
        f"{split}_fid_floor_mean": fid_floor[0],
        f"{split}_fid_floor_std": fid_floor[1],
        f"{split}_kid": kid[0],
        f"{split}_kid_std": kid[1],
        f"{split}_kid_floor_mean": kid_floor[0],
        f"{split}_kid_floor_std": kid_floor[1],
        f"{split}_fidelity": _balanced_accuracy(_predict(nets["fidelity"], fid_images), labels),
        f"{split}_fidelity_ceiling": _balanced_accuracy(_predict(nets["fidelity"], pool.images(captions)), labels),
        f"{split}_diversity": gen_spread / real_spread,
        f"{split}_distinct": np.mean(
            [len({g.numpy().tobytes() for g in group}) / len(group) for group in diversity_images]
        ),
        "floor_values": [metrics.frechet_distance(f, reference) for f in floor],
    }


def _real_source(split):
    """Real images of the split for the stub: the first floor subset's (whose captions are generated for) first."""
    pool = ShapesDataset(split, SIZES[split] + SUBSETS * N, image_size=8, palette=5, seed=3)
    first = list(range(SIZES[split], SIZES[split] + N))
    order = first + [r for r in range(len(pool)) if r not in first]
    return {"images": pool.images(torch.tensor(order)), "captions": [pool.captions[r] for r in order]}


def _check(out, stub, cache, split):
    """The metrics `out` against the direct computation, from the images the stub gave."""
    (captions, temperature, images), *rest = stub.calls
    assert not rest, "one generate call per evaluation at these sizes"
    assert temperature == TEMPERATURE  # t2i.sample_temperature reaches the model
    fid_images, diversity = images[:N], images[N:].reshape(CAPTIONS, PER_CAPTION, *images.shape[1:])
    direct = _direct_metrics(cache, split, fid_images, diversity)
    assert captions[:N] == direct["captions"]  # generated for the captions of the right split's first floor subset
    assert captions[N:] == direct["diversity_captions"]
    keys = sorted(k for k in direct if k.startswith(split))
    assert sorted(k for k in out if k.startswith(f"{split}_") and not k.endswith(("loss", "bits_per_pixel"))) == keys
    for key in keys:
        assert out[key] == pytest.approx(direct[key], rel=1e-6, abs=1e-9), key
    return direct


def test_real_generator_scores_the_floor_and_the_ceiling(tmp_path, cache, torch_attention_path, small_evaluation):
    task = t2i_task.TextToImageTask(_config(cache))
    accelerator = _accelerator()
    stub = StubGenerator(_real_source("test"))
    out = task.final_evaluate(stub, accelerator, tmp_path)
    assert out["test_loss"] == 0.0
    direct = _check(out, stub, cache, "test")
    # real images of the generated captions: FID is the first floor subset's, fidelity the ceiling
    assert out["test_fid"] == pytest.approx(direct["floor_values"][0], rel=1e-9)
    assert out["test_fidelity"] == pytest.approx(out["test_fidelity_ceiling"])
    assert out["test_fid_floor_std"] > 0 and len(set(direct["floor_values"])) == SUBSETS
    assert 0.3 < out["test_diversity"] < 3 and out["test_distinct"] > 1 / PER_CAPTION

    stub = StubGenerator(_real_source("val"))
    out = task.evaluate(stub, accelerator, step=2, out_dir=tmp_path)
    assert out.pop("samples").exists()
    _check(out, stub, cache, "val")
    assert stub.compile == [False]  # eager steps unless t2i.sample_compile

    task = t2i_task.TextToImageTask(_config(cache, "t2i.sample_compile=true"))
    stub = StubGenerator(_real_source("val"))
    task.evaluate(stub, accelerator, step=2, out_dir=tmp_path)
    assert stub.compile == [True]


def test_inception_fid_is_opt_in_and_fetched_when_the_task_is_built(
    tmp_path, cache, torch_attention_path, small_evaluation, monkeypatch
):
    """Off by default (the metric is never asked for); on, it is built once with the task, an unavailable one is a
    ValueError naming t2i.inception_fid then, and each evaluation reports {split}_inception_fid through it."""
    from .test_t2i import RecordingMetric

    def unavailable():
        raise RuntimeError("Inception FID needs torchmetrics and its Inception weights: ImportError: none here")

    monkeypatch.setattr(t2i_task, "inception_fid_metric", unavailable)
    t2i_task.TextToImageTask(_config(cache))  # off: nothing fetched
    with pytest.raises(ValueError, match="t2i.inception_fid=true: .*torchmetrics"):
        t2i_task.TextToImageTask(_config(cache, "t2i.inception_fid=true"))

    built = []
    monkeypatch.setattr(t2i_task, "inception_fid_metric", lambda: built.append(RecordingMetric()) or built[-1])
    task = t2i_task.TextToImageTask(_config(cache, "t2i.inception_fid=true"))
    assert len(built) == 1
    stub = StubGenerator(_real_source("val"))
    out = task.evaluate(stub, accelerator=_accelerator(), step=2, out_dir=tmp_path)
    (_, _, images), *_ = stub.calls
    pool, lay = task.eval_pool("val"), task.layout("val")
    assert out["val_inception_fid"] == pytest.approx(
        metrics.inception_fid(RecordingMetric(), pool.images(lay.reference), images[:N])
    )
    assert len(built) == 1 and built[0].resets == 1


def test_collapsed_generator_fails_diversity_and_fidelity(tmp_path, cache, torch_attention_path, small_evaluation):
    task = t2i_task.TextToImageTask(_config(cache))
    one = ShapesDataset("train", 1, image_size=8, palette=5, seed=3).images()
    stub = StubGenerator(collapsed=one)
    out = task.final_evaluate(stub, _accelerator(), tmp_path)
    _check(out, stub, cache, "test")
    assert out["test_diversity"] == 0 and out["test_distinct"] == pytest.approx(1 / PER_CAPTION)
    assert out["test_fidelity"] < out["test_fidelity_ceiling"]
    assert out["test_fid"] > out["test_fid_floor_mean"] + 2 * out["test_fid_floor_std"]


def test_hf_layout_and_floor(tmp_path, torch_attention_path, small_evaluation, monkeypatch):
    """hf: the reference is the front of the split, the floor subsets its last blocks (as many as fit); captions do
    not repeat, so diversity is not reported but distinct is."""
    from tests.test_t2i import _image_folder

    _, folder = _image_folder(tmp_path, monkeypatch, n=60)
    size, subsets = 20, 3  # 20 // N - 1 = 3 subsets fit beside a reference of at least N
    cfg = _config(
        tmp_path / "cache", "data.name=hf", f"t2i.hf_dataset={folder}", "t2i.palette=3", f"t2i.num_test={size}"
    )
    task = t2i_task.TextToImageTask(cfg)
    test = task.splits["test"]
    first = size - subsets * N
    layout = task.layout("test")
    assert layout.reference == slice(0, first)
    assert layout.floor == tuple(slice(first + i * N, first + (i + 1) * N) for i in range(subsets))
    rows = list(range(first, first + N)) + [r for r in range(size) if not first <= r < first + N]
    stub = StubGenerator({"images": test.images(torch.tensor(rows)), "captions": [test.captions[r] for r in rows]})
    out = task.final_evaluate(stub, _accelerator(), tmp_path)
    net = task.net("feature")
    reference = metrics.extract_features(net, test.images(slice(0, first)))
    floor = [metrics.frechet_distance(metrics.extract_features(net, test.images(s)), reference) for s in layout.floor]
    assert out["test_fid"] == pytest.approx(floor[0], rel=1e-9)
    assert (out["test_fid_floor_mean"], out["test_fid_floor_std"]) == pytest.approx(_mean_std(floor), rel=1e-9)
    assert out["test_fidelity"] == pytest.approx(out["test_fidelity_ceiling"])
    assert "test_diversity" not in out and 0 < out["test_distinct"] <= 1
    cfg.t2i.fid_samples = 7  # 20 // 7 - 1 = 1 floor subset: no std, refused before training
    with pytest.raises(ValueError, match="fid_samples=7"):
        t2i_task.TextToImageTask(cfg).datasets()


def test_scenes_evaluation_pool_floor_and_ceiling(tmp_path, torch_attention_path, small_evaluation, monkeypatch):
    """data.name=scenes: the splits and the evaluation pool are the scenes of t2i.data_seed; the floor subsets are the
    disjoint n-row blocks after the reference; real images of the generated captions score the first subset's FID and,
    as fidelity, the ceiling, which the judge reaches on the scenes' own labels."""
    from cosformer.t2i.scenes import SceneDataset, scene_classes

    for kind, (cls, arch, train) in list(metrics.NETS.items()):  # 32x32 scenes: smaller batches keep the test short
        monkeypatch.setitem(metrics.NETS, kind, (cls, arch, train | {"batch_size": 16}))

    cfg = _config(tmp_path / "cache", "data.name=scenes", "t2i.image_size=32", "t2i.palette=7", "t2i.text_max_len=72")
    task = t2i_task.TextToImageTask(cfg)
    pool = task.eval_pool("test")
    drawn = SceneDataset("test", SIZES["test"] + SUBSETS * N, image_size=32, palette=7, text_max_len=72, seed=3)
    assert torch.equal(pool.indices, drawn.indices) and pool.captions == drawn.captions
    assert torch.equal(pool.labels(), drawn.labels()) and task.splits["train"].attribute_classes() == scene_classes(7)
    layout = task.layout("test")
    first = SIZES["test"]
    assert layout.reference == slice(0, first)
    assert layout.floor == tuple(slice(first + i * N, first + (i + 1) * N) for i in range(SUBSETS))
    rows = list(range(first, first + N)) + [r for r in range(len(pool)) if not first <= r < first + N]
    stub = StubGenerator({"images": pool.images(torch.tensor(rows)), "captions": [pool.captions[r] for r in rows]})
    out = task.final_evaluate(stub, _accelerator(), tmp_path)
    net = task.net("feature")
    reference = metrics.extract_features(net, pool.images(layout.reference))
    floor = [metrics.frechet_distance(metrics.extract_features(net, pool.images(s)), reference) for s in layout.floor]
    assert out["test_fid"] == pytest.approx(floor[0], rel=1e-9)
    assert (out["test_fid_floor_mean"], out["test_fid_floor_std"]) == pytest.approx(_mean_std(floor), rel=1e-9)
    labels = pool.labels(layout.captions).numpy()
    ceiling = _balanced_accuracy(_predict(task.net("fidelity"), pool.images(layout.captions)), labels)
    assert out["test_fidelity_ceiling"] == pytest.approx(ceiling) and out["test_fidelity"] == pytest.approx(ceiling)
