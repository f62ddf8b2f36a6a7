"""The test suite: math with known answers, data and metrics, and each script end to end.

    python -m pytest -q

Layout: common.py (data, metrics, grids, its command line); then the contract every model script
keeps, tested on all three with the same test (resume, torchrun, faults, bad input, commands); then
one section per model for its own math and commands. Scripts run on a tiny image folder the tests
write themselves, at tiny widths, so the whole suite stays within minutes on two CPU cores.
"""

import argparse
import ast
import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.nn.utils import parametrize

import common
import ebm
import ncsn
import vae
from experiments import (
    aasae,
    ebm_chains,
    ebm_toy,
    likelihood,
    measures,
    ncsn_inpaint,
    ncsn_samplers,
    ncsn_techniques,
    toys,
    vae_interpolate,
)

ROOT = Path(__file__).resolve().parent
REAL_DATA = Path(os.environ.get("JPEG", ROOT / "data" / "cifar10-jpeg"))  # a folder copy
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MODELS = {"ncsn": ncsn, "vae": vae, "ebm": ebm}
# each script at a size that trains an epoch of 64 images in about a second on one CPU thread
TINY = {
    "ncsn": ["--width", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--num-scales", "10",
             "--steps-per-level", "1", "--batch-size", "16", "--log-every", "2",
             "--limit-test", "16"],
    "vae": ["--width", "8", "--blocks", "1", "--latent-channels", "4", "--mixtures", "3",
            "--batch-size", "16", "--log-every", "2"],
    "ebm": ["--width", "8", "--sgld-steps", "3", "--buffer-size", "200", "--batch-size", "16",
            "--log-every", "2"],
}


def run_script(script, *args, check=True, timeout=300, torchrun=False):
    """Run `python script args` (or a two-process torchrun) as a user would; returns the
    CompletedProcess."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"] if torchrun else [sys.executable]
    proc = subprocess.run([*launcher, str(ROOT / script), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, (f"{script} {args} failed:\n{proc.stdout[-3000:]}\n"
                                      f"{proc.stderr[-3000:]}")
    return proc


def train_args(model, data, tmp, *extra):
    """Command-line arguments for a tiny training run of `model` on `data`, writing under tmp."""
    return ["--data", str(data), "--data-root", str(tmp / "data"), "--run-dir", str(tmp / "runs"),
            "--device", "cpu", *TINY[model], *map(str, extra)]


def only_run(folder):
    runs = [p for p in Path(folder).iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def write_images(folder, n, size=(32, 32), mode="RGB", ext="png", seed=0):
    """n smooth random images: colour blobs, so models have structure to learn."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]] / max(size)
    for i in range(n):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))[..., None]
        colour, background = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        pixels = (255 * (blob * colour + (1 - blob) * background)).astype(np.uint8)
        Image.fromarray(pixels, "RGB").convert(mode).save(folder / f"{i:04d}.{ext}")


def folder_digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# In-process runs use one thread, like the subprocesses (OMP_NUM_THREADS=1): bit-identical results
# need the same thread count (it changes the order of floating-point sums), and on a busy machine
# two spin-waiting threads per process can make a tiny convolution many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory):
    """A folder with train/ (64 images) and test/ (16) splits, two class folders each."""
    root = tmp_path_factory.mktemp("tiny")
    for split, n in (("train", 32), ("test", 8)):
        for k, cls in enumerate(("blobs_a", "blobs_b")):
            write_images(root / split / cls, n, seed=100 * k + (split == "test"))
    return root


# ------------------------------------------------------------------------------------------------
# Offline metrics: a small fixed random feature extractor, registered with torch-fidelity from here
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def tiny_random_features():
    """Register 'tiny-random' with torch-fidelity: a small fixed random conv net as feature
    extractor.

    It lets the whole FID / IS / KID pipeline run offline (no Inception weights here). Its scores
    measure a real distance between feature statistics but are NOT comparable with any published
    number.
    """
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class TinyRandomFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            g = torch.Generator().manual_seed(0)
            self.w1 = torch.nn.Parameter(torch.randn(32, 3, 4, 4, generator=g) / 7,
                                         requires_grad=False)
            self.w2 = torch.nn.Parameter(torch.randn(64, 32, 4, 4, generator=g) / 23,
                                         requires_grad=False)
            self.head = torch.nn.Parameter(torch.randn(10, 64, generator=g) / 8,
                                           requires_grad=False)

        @staticmethod
        def get_provided_features_list():
            return ("features", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        def forward(self, x):  # x: (B, 3, H, W) uint8, as torch-fidelity hands it over
            h = torch.nn.functional.conv2d(x.float() / 127.5 - 1, self.w1, stride=2).tanh()
            h = torch.nn.functional.conv2d(h, self.w2, stride=2).tanh().mean((2, 3))  # (B, 64)
            out = {"features": h.double(), "logits": (h @ self.head.T).double()}
            return tuple(out[f] for f in self.features_list)

    if "tiny-random" not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor("tiny-random", TinyRandomFeatures)


def frechet_distance(features_1, features_2):
    """Frechet distance between Gaussians fitted to two (N, F) feature sets, by torch-fidelity's own
    code."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    stats = [fid_features_to_statistics(f.double().cpu()) for f in (features_1, features_2)]
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


# ------------------------------------------------------------------------------------------------
# common.py: data
# ------------------------------------------------------------------------------------------------

def test_odd_images_are_converted_to_rgb_32x32(tmp_path):
    write_images(tmp_path / "a", 3, size=(64, 48), mode="L", ext="jpg")
    write_images(tmp_path / "b", 3, size=(20, 40), mode="RGBA", ext="webp", seed=1)
    write_images(tmp_path / "c", 3, size=(32, 32), mode="P", ext="bmp", seed=2)
    write_images(tmp_path / "d", 3, mode="RGB", ext="png", seed=3)
    from PIL import Image

    deep = np.array([[1000, 30000, 60000] * 10 + [0, 0]] * 32, dtype=np.uint16)
    # 16-bit greyscale: rescaled, not clipped
    Image.fromarray(deep).save(tmp_path / "d" / "sixteen_bit.png")
    (tmp_path / "notes.txt").write_text("ignored")
    train = common.load_images(str(tmp_path), str(tmp_path / "cache"), "train")
    test = common.load_images(str(tmp_path), str(tmp_path / "cache"), "test")
    assert train.dtype == torch.uint8 and train.shape[1:] == (3, 32, 32)
    assert len(train) + len(test) == 13 and len(test) == 1  # 5% of 13 rounds to 1
    sixteen = common._to_32x32(tmp_path / "d" / "sixteen_bit.png")
    assert sixteen[0, :3, 0].tolist() == [4, 117, 233]  # 1000, 30000, 60000 of 65535
    grey = common._to_32x32(tmp_path / "a" / "0000.jpg")
    assert grey.shape == (32, 32, 3) and (grey[..., 0] == grey[..., 1]).all()


def test_unreadable_files_are_named_on_every_run_not_only_the_first(tmp_path, capsys):
    write_images(tmp_path / "imgs", 6, ext="jpg")
    good = (tmp_path / "imgs" / "0000.jpg").read_bytes()
    # a truncated JPEG among good ones
    (tmp_path / "imgs" / "cut.jpg").write_bytes(good[: len(good) // 2])
    for _ in range(2):  # the second run reads the cache: the warning must still be there
        images = common.load_images(str(tmp_path / "imgs"), str(tmp_path / "root"), "train")
        err = capsys.readouterr().err.strip().splitlines()
        assert (len(images) == 5 and len(err) == 1 and "1 unreadable" in err[0]
                and "cut.jpg" in err[0])
    (tmp_path / "junk").mkdir()
    for i in range(3):
        (tmp_path / "junk" / f"{i}.png").write_bytes(b"not an image")
    # (1 of 3: test)
    with pytest.raises(common.UserError, match="none of 2 image files .* could be read"):
        common.load_images(str(tmp_path / "junk"), str(tmp_path / "root"), "train")
    assert capsys.readouterr().err == ""


def test_split_is_seeded_and_cache_follows_the_folder(tmp_path):
    write_images(tmp_path / "flat", 40)
    cache = tmp_path / "cache"
    a = common.load_images(str(tmp_path / "flat"), str(cache), "test")
    assert torch.equal(a, common.load_images(str(tmp_path / "flat"), str(cache), "test"))
    assert len(list((cache / "cache").glob("*.pt"))) == 1
    write_images(tmp_path / "extra", 1, seed=9)
    (tmp_path / "extra" / "0000.png").rename(tmp_path / "flat" / "new.png")
    common.load_images(str(tmp_path / "flat"), str(cache), "test")
    assert len(list((cache / "cache").glob("*.pt"))) == 2  # a changed folder gets a new cache entry


def test_a_folder_is_shuffled_with_its_labels_centre_cropped_and_recached_when_a_file_changes(
        tmp_path):
    """Bugs it catches: images kept in class order (the first N of --limit-train all one class),
    labels not shuffled with their images, a crop from the corner instead of the centre, and a
    cache key blind to a file rewritten at the same size (its stale decoded copy read again)."""
    from PIL import Image

    for cls, value in (("dark", 20), ("light", 230)):  # flat images: the class shows in the pixels
        (tmp_path / "flat" / cls).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (32, 32), (value + i,) * 3).save(tmp_path / "flat" / cls / f"{i}.bmp")
    split = common.load_split(str(tmp_path / "flat"), str(tmp_path / "root"), "train")
    light = split["images"].float().mean((1, 2, 3)) > 128
    assert torch.equal(light, split["labels"] == split["classes"].index("light"))
    assert 0 < light[:10].sum() < 10  # the first ten images hold both classes
    bands = np.zeros((32, 64, 3), np.uint8)  # red, green, blue columns 0-15, 16-47, 48-63
    bands[:, :16, 0], bands[:, 16:48, 1], bands[:, 48:, 2] = 255, 255, 255
    Image.fromarray(bands).save(tmp_path / "bands.png")
    assert (common._to_32x32(tmp_path / "bands.png") == [0, 255, 0]).all()  # the centre, all green
    path = common._folder_split(str(tmp_path / "flat"), "train")[1][0]  # a training image,
    # rewritten: the same size, other pixels
    Image.new("RGB", (32, 32), (99,) * 3).save(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    again = common.load_split(str(tmp_path / "flat"), str(tmp_path / "root"), "train")["images"]
    assert len(list((tmp_path / "root" / "cache").glob("*.pt"))) == 2
    assert (again == 99).any() and not (split["images"] == 99).any()


def test_missing_empty_and_file_paths_are_clear_errors(tmp_path):
    with pytest.raises(common.UserError, match="no such folder"):
        common.load_images(str(tmp_path / "nope"), str(tmp_path), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="no images"):
        common.load_images(str(tmp_path / "empty"), str(tmp_path), "train")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(common.UserError, match="--data .*a file, not a folder"):
        common.load_images(str(tmp_path / "a_file"), str(tmp_path), "train")
    write_images(tmp_path / "imgs", 2)
    with pytest.raises(common.UserError, match="--data-root .*a file, not a folder"):
        common.load_images(str(tmp_path / "imgs"), str(tmp_path / "a_file"), "train")


def test_cifar10_without_network_says_where_to_put_the_archive(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    monkeypatch.setattr(tv_utils.urllib.request, "urlopen", offline)
    with pytest.raises(common.UserError, match="cifar-10-python.tar.gz.*--data PATH"):
        common.load_images("cifar10", str(tmp_path), "train")


RACE = """
import sys, time, numpy as np, torch.distributed as dist, torchvision.datasets
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import common

class Cifar10:  # torchvision's CIFAR10, as slow as a download and as careless as several at once
    def __init__(self, root, train, download):
        done, log = Path(root) / "cifar-10-batches-py", open(Path(root) / "log", "a")
        if not done.exists():
            (log.write(f"download {dist.get_rank()}\\n"), log.flush(), time.sleep(2),
             done.mkdir(exist_ok=True))
        log.write(f"read {dist.get_rank()} {done.exists()}\\n")
        self.data, self.targets, self.classes = np.zeros((4, 32, 32, 3), np.uint8), [0] * 4, ["a"]

torchvision.datasets.CIFAR10 = Cifar10
dist.init_process_group("gloo")
common.load_split("cifar10", sys.argv[2], "train")
"""


def test_cifar10_is_downloaded_by_one_process_while_the_others_wait(tmp_path):
    """Under torchrun every rank loads CIFAR-10. Bug it catches: each rank downloading and
    extracting the same archive into data/ at once (before the fix: three downloads, reads before
    the files)."""
    (tmp_path / "race.py").write_text(RACE)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=3", str(tmp_path / "race.py"), str(ROOT), str(tmp_path)],
                   env=ENV, check=True, capture_output=True, timeout=120)
    log = (tmp_path / "log").read_text().split("\n")[:-1]
    assert log[0].startswith("download") and sum(line.startswith("download") for line in log) == 1
    assert sorted(log[1:]) == ["read 0 True", "read 1 True", "read 2 True"], log


def test_device_loader_sees_every_image_once_and_flips_about_half_unless_told_not_to():
    n = 1000
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256  # identity in two pixels ...
    images[:, 1, 0, 0] = torch.arange(n) // 256
    images[:, 2, 0, 0] = 255  # ... and a marker that moves to column 31 when flipped
    loader = common.DeviceLoader(images, 100, "cpu", seed=3)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 10
    x = torch.cat(batches)
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    flipped = x[:, 2, 0, 31] == 1
    col = torch.where(flipped, 31, 0)
    ids = (x[range(n), 0, 0, col] * 255).round() + 256 * (x[range(n), 1, 0, col] * 255).round()
    assert sorted(ids.long().tolist()) == list(range(n))
    assert 400 < int(flipped.sum()) < 600
    again = torch.cat(list(loader.epoch(0)))
    other = torch.cat(list(loader.epoch(1)))
    assert torch.equal(x, again) and not torch.equal(x, other)  # order = f(seed, epoch)
    # flip=False (the EBM, as IGEBM): the same order, no image mirrored. Bug it catches: the flag
    # ignored (the EBM's test above sees only that it is passed)
    plain = torch.cat(list(common.DeviceLoader(images, 100, "cpu", seed=3, flip=False).epoch(0)))
    assert not (plain[:, 2, 0, 31] == 1).any() and torch.equal(plain[~flipped], x[~flipped])


def test_device_loader_ddp_shards_are_disjoint_and_complete():
    images = torch.arange(600, dtype=torch.int64).view(600, 1, 1, 1).expand(600, 3, 32, 32)
    images = torch.stack([images[:, 0] % 256, images[:, 0] // 256, images[:, 0] * 0],
                         1).to(torch.uint8)
    seen = []
    for rank in range(3):
        loader = common.DeviceLoader(images, 50, "cpu", seed=0, rank=rank, world_size=3, flip=False)
        x = torch.cat(list(loader.epoch(5)))
        seen.append(set(((x[:, 0, 0, 0] * 255).round()
                         + 256 * (x[:, 1, 0, 0] * 255).round()).long().tolist()))
    assert all(len(s) == 200 for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    assert set.union(*seen) == set(range(600))


def test_toy_data_shapes_and_mixture_weights():
    g = torch.Generator().manual_seed(0)
    x = toys.toy_data("mixture", 20000, g)
    assert x.shape == (20000, 2)
    assert abs((x[:, 0] > 0).float().mean().item() - 0.8) < 0.01
    for name in ("8gaussians", "rings"):
        assert toys.toy_data(name, 100, g).shape == (100, 2)
    # the exact log density integrates to 1 over a fine grid
    grid = torch.stack(torch.meshgrid(torch.linspace(-12, 12, 481), torch.linspace(-12, 12, 481),
                                      indexing="ij"), -1)
    mass = toys.mixture_log_prob(grid.reshape(-1, 2)).exp().sum() * (24 / 480) ** 2
    assert abs(mass.item() - 1) < 1e-3
    # blurred by sigma = 3 it is the data plus N(0, 9 I): mean (3, 3), total variance 2 (1 + 9) plus
    # the modes' 2 x 0.8 x 0.2 x 10^2. Bug it catches: each mode's variance 1 + sigma (40, not 52:
    # the likelihood ODE's drift then grows as e^sigma, and its test never ends)
    axis = torch.linspace(-25, 25, 1001, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    p = toys.mixture_log_prob(grid, 3.0).exp() * 0.05**2
    mean = (p[:, None] * grid).sum(0)
    assert p.sum().item() == pytest.approx(1, abs=1e-4)
    assert mean.tolist() == pytest.approx([3, 3], abs=1e-4)
    assert (p * (grid - mean).pow(2).sum(1)).sum().item() == pytest.approx(52, abs=1e-3)


# ------------------------------------------------------------------------------------------------
# common.py: metrics
# ------------------------------------------------------------------------------------------------

def test_bits_per_dim_of_a_uniform_model_is_exactly_8():
    nll_uniform = common.IMAGE_DIMS * math.log(256)  # each of 3072 subpixels has probability 1/256
    assert common.bits_per_dim(nll_uniform) == pytest.approx(8.0, abs=1e-12)
    assert common.bits_per_dim(math.log(2), dims=1) == pytest.approx(1.0)


def test_frechet_distance_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    n, d = 200_000, 4
    mu1, mu2 = torch.tensor([0.0, 1, 2, 3]), torch.tensor([1.0, 1, 0, 3])
    var1, var2 = torch.tensor([1.0, 4, 0.25, 2]), torch.tensor([2.0, 1, 0.25, 9])
    f1 = mu1 + var1.sqrt() * torch.randn(n, d, generator=g, dtype=torch.float64)
    f2 = mu2 + var2.sqrt() * torch.randn(n, d, generator=g, dtype=torch.float64)
    # diagonal Gaussians: |mu1 - mu2|^2 + sum (sqrt(var1) - sqrt(var2))^2
    exact = ((mu1 - mu2) ** 2).sum() + ((var1.sqrt() - var2.sqrt()) ** 2).sum()
    assert frechet_distance(f1, f2) == pytest.approx(exact.item(), rel=0.02)


def test_metric_pipeline_offline_scores_itself_near_zero_and_shifted_worse(tiny_images, tmp_path):
    train = common.load_images(str(tiny_images), str(tmp_path), "train").float() / 255
    same = common.generative_metrics(train, str(tiny_images), str(tmp_path),
                                     extractor="tiny-random")
    shifted = common.generative_metrics((train + 0.3).clamp(0, 1), str(tiny_images), str(tmp_path),
                                        extractor="tiny-random")
    assert (same["n_samples"] == 64 and same["n_reference"] == 64
            and same["extractor"] == "tiny-random")
    assert abs(same["fid"]) < 1e-6 and shifted["fid"] > 0.01
    assert shifted["kid_mean"] > same["kid_mean"] and same["is_mean"] >= 1.0
    assert list((tmp_path / "fidelity_cache").iterdir())  # reference statistics were cached
    # another dataset under the same --data-root gets its own reference statistics, not these
    write_images(tmp_path / "other" / "train", 32, seed=7)
    write_images(tmp_path / "other" / "test", 4, seed=8)
    other = common.load_images(str(tmp_path / "other"), str(tmp_path), "train").float() / 255
    itself = common.generative_metrics(other, str(tmp_path / "other"), str(tmp_path),
                                       extractor="tiny-random")
    assert abs(itself["fid"]) < 1e-6 and itself["n_reference"] == 32
    with pytest.raises(common.UserError, match="--fid-extractor no-such-net"):
        common.check_metrics(len(train), "no-such-net")


def test_metrics_without_weights_name_the_flag(tmp_path, monkeypatch):
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached weights
    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url",
                        offline)
    with pytest.raises(common.UserError, match="--fid-weights FILE"):
        common.check_metrics(10)


def test_linear_probe_separates_separable_classes_and_is_at_chance_on_shuffled_labels():
    """Bugs it catches: a probe scored on its own training set, a bias that never trains, labels and
    features out of step (shuffled rows), the standardisation computed on the test set."""
    g = torch.Generator().manual_seed(0)
    classes, dims = 5, 40
    centres = 4 * torch.randn(classes, dims, generator=g)
    labels = torch.randint(0, classes, (3000,), generator=g)
    # the bias must absorb it
    features = centres[labels] + torch.randn(3000, dims, generator=g) + 100
    train, test = slice(0, 2000), slice(2000, 3000)
    probe = measures.linear_probe(features[train], labels[train], features[test],
                                labels[test], classes)
    assert probe["top1"] > 0.99 and probe["l2"] in (1e-4, 1e-3, 1e-2, 0.1, 1, 10)
    noise = torch.randn(3000, dims, generator=g)  # features that say nothing about the labels
    probe = measures.linear_probe(noise[train], labels[train], noise[test], labels[test], classes)
    assert abs(probe["top1"] - 1 / classes) < 0.05  # chance 0.2; standard error at 1,000: 0.013
    shuffled = labels[torch.randperm(3000, generator=g)]  # real features, labels no longer theirs
    probe = measures.linear_probe(features[train], shuffled[train], features[test],
                                shuffled[test], classes)
    assert abs(probe["top1"] - 1 / classes) < 0.05


def test_linear_probe_standardises_the_test_set_as_the_training_set():
    """Two classes at 0 and 1 (three features, noise 0.1) and a test set of class 1 alone: every
    point right. Bug it catches: the test set standardised by its own statistics, which moves its
    points onto the boundary (measured over 5 seeds: 0.40-0.56 right)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (600,), generator=g)
    x = labels[:, None].float() + 0.1 * torch.randn(600, 3, generator=g)
    ones = labels[400:] == 1
    probe = measures.linear_probe(x[:400], labels[:400], x[400:][ones], labels[400:][ones], 2)
    assert probe["top1"] == 1.0


def test_linear_probe_chooses_its_l2_without_the_test_set():
    """Features that say nothing of the labels, scored against three sets of test labels: the l2 the
    held-out tenth of the training set chooses stays the same. Bug it catches: the l2 chosen by its
    test accuracy, which reports the best of six tries as the score (measured over 4 seeds: the
    choice moved with the test labels in 4 of 4, two sets of labels each)."""
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(3000, 40, generator=g), torch.randint(0, 5, (3000,), generator=g)
    chosen = {measures.linear_probe(features[:2000], labels[:2000], features[2000:],
                                    torch.randint(0, 5, (1000,), generator=g), 5)["l2"]
              for _ in range(3)}
    assert len(chosen) == 1


def test_linear_probe_is_fitted_to_its_minimum_not_stopped_early():
    """More features than images and a weak L2 (as raw pixels of a small training set): the
    objective needs hundreds of L-BFGS evaluations. Bug it catches: one L-BFGS call capped at 100
    iterations (the probe used to stop there: on raw pixels at l2 = 1e-3, objective 0.780 against
    0.617)."""
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.randn(300, 1, 8, 8, generator=g), size=24, mode="bicubic",
                           align_corners=False)
    x = (smooth + 0.05 * torch.randn(300, 1, 24, 24, generator=g)).flatten(1)
    x, y = (x - x.mean(0)) / x.std(0), torch.randint(0, 10, (300,), generator=g)

    def objective(w):
        return (F.cross_entropy(F.pad(x.double(), (0, 1), value=1.0) @ w, y)
                + 5e-4 * w[:-1].pow(2).sum())

    w, fit = measures.fit_linear_probe(x, y, 10, l2=1e-3)
    capped, stopped = measures.fit_linear_probe(x, y, 10, l2=1e-3, max_iter=100)
    assert fit["grad_max"] <= 1e-5 and fit["evaluations"] > 200  # measured: 278 evaluations
    # 5.8e-4; 0.3838 / 0.3825
    assert stopped["grad_max"] > 1e-4 and objective(capped) > objective(w) + 1e-3


def test_auroc_is_the_probability_that_an_inlier_scores_higher():
    assert measures.auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert measures.auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    # ties count half
    assert measures.auroc(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.5
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, generator=g) + 1, torch.randn(4000, generator=g)
    # two unit normals one apart: P(a > b) = Phi(1 / sqrt(2)) = 0.7602
    assert measures.auroc(a, b) == pytest.approx(0.7602, abs=0.01)


def test_to_uint8_clamps_before_converting():
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.7])
    assert common.to_uint8(x).tolist() == [0, 0, 128, 255, 255]


# ------------------------------------------------------------------------------------------------
# common.py: grids, plots, the data exploration; experiments/: benchmarks and the comparison table
# ------------------------------------------------------------------------------------------------

def test_grids_panels_and_metric_plots_are_written(tmp_path):
    common.save_grid(torch.rand(10, 3, 32, 32) * 2 - 0.5, tmp_path / "grid.png")
    common.save_grid(torch.rand(10, 3, 32, 32), tmp_path / "captioned.png",
                     caption="what drew them")
    common.save_rows([("a", torch.rand(4, 3, 32, 32)), ("b", torch.rand(2, 3, 32, 32))],
                     tmp_path / "rows.png")
    common.save_panels({"points": torch.randn(100, 2), "density": torch.rand(20, 20)},
                       tmp_path / "panels.png", 3)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / (s + 1)})
                                                    + "\n" for s in range(5)))
    assert [r["step"] for r in common.read_metrics(tmp_path)] == list(range(5))
    path = common.plot_metrics(tmp_path)
    for name in ("grid.png", "captioned.png", "rows.png", "panels.png", path.name):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    from PIL import Image

    with (Image.open(tmp_path / "grid.png") as plain,
          Image.open(tmp_path / "captioned.png") as captioned):
        assert captioned.height > plain.height  # room for the caption above the same grid


def test_explore_and_the_data_loader_benchmark(tiny_images, tmp_path):
    out = run_script("common.py", "explore", "--data", tiny_images, "--data-root", tmp_path,
                     "--out", tmp_path / "x")
    stats = json.loads((tmp_path / "x" / "stats.json").read_text())
    assert (stats["images_per_class"] == {"blobs_a": 32, "blobs_b": 32}
            and "channel mean" in out.stdout)
    x = common.load_images(str(tiny_images), str(tmp_path), "train").float() / 255
    assert stats["channel_mean"] == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-6)
    assert stats["channel_std"] == pytest.approx(x.std((0, 2, 3)).tolist(), abs=1e-6)
    for name in ("class_counts.png", "pixel_histograms.png", "examples.png", "mean_image.png"):
        assert (tmp_path / "x" / name).exists()
    bench = run_script("experiments/bench_data.py", "--data", tiny_images, "--data-root", tmp_path,
                       "--batch-size", 16)
    assert bench.stdout.strip().splitlines()[-1].startswith("ratio:")
    bad = run_script("common.py", "explore", "--data", tmp_path / "nope", check=False)
    assert bad.returncode != 0 and "no such folder" in bad.stderr and "Traceback" not in bad.stderr


def test_compare_tables_runs_and_shows_missing_metrics_as_missing(tmp_path):
    full = tmp_path / "vae__a__1__20260101-000000"
    (full / "samples").mkdir(parents=True)
    (full / "config.json").write_text(json.dumps({"args": {}}))
    rows = [{"step": 1, "img_per_s": 10.0}, {"step": 2, "img_per_s": 30.0},
            {"step": 3, "img_per_s": 20.0},
            {"step": 3, "epoch": 1, "epoch_seconds": 42.0, "test_bpd": 5.5}]
    (full / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (full / "eval.json").write_text(json.dumps({"fid": 12.5, "is_mean": 3.25, "kid_mean": 0.01,
                                                "n_samples": 500, "extractor": "tiny-random",
                                                "test_iwae_bpd": 5.25, "iw_samples": 20,
                                                "n_test": 1000, "sampling_seconds_per_1000": 2.0,
                                                "nfe_per_sample": 1}))
    torch.save({"model": "vae", "net": {"w": torch.zeros(10, 3)}, "epoch": 1},
               full / "checkpoint.pt")
    common.save_grid(torch.rand(4, 3, 32, 32), full / "samples" / "epoch_0001.png")
    ode = tmp_path / "ncsn__c__1__20260101-000000"
    ode.mkdir()
    (ode / "config.json").write_text(json.dumps({"args": {}}))
    (ode / "likelihood.json").write_text(json.dumps({"bits_per_dim": 4.125,
                                                     "method": "probability-flow ODE", "n": 100,
                                                     "spread": 0.012}))
    bare = tmp_path / "ncsn__b__1__20260101-000000"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"args": {}}))
    run_script("experiments/compare.py", full, ode, bare, "--out", tmp_path / "out")
    table = (tmp_path / "out" / "compare.md").read_text().splitlines()
    cells = {name: [c.strip()
                    for c in next(line for line in table if name in line).strip("|").split("|")]
             for name in (full.name, ode.name, bare.name)}
    # median speed; IWAE before the last logged ELBO
    assert cells[full.name][:10] == ["vae", full.name, "30", "20.0", "42", "1", "5.250",
                                     "IWAE K 20, N 1,000", "12.50", "3.25"]
    assert cells[full.name][11:] == ["500", "tiny-random", "2.0", "1"]
    assert cells[ode.name][6:8] == ["4.125", "probability-flow ODE, N 100, +- 0.012"]
    assert cells[bare.name][2:] == ["—"] * 13
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000
    bad = run_script("experiments/compare.py", tmp_path / "nothing", check=False)
    assert bad.returncode == 1 and "not a run folder" in bad.stderr


def test_readme_quick_start_is_what_ci_runs_and_what_the_tests_exercise():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert quick_start == ["pip install -r requirements.txt && python ncsn.py --epochs 200",
                           "python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -r requirements.txt" in ci and ci.strip().endswith(quick_start[1])
    # the main job: the NCSNv2 recipe (trained small below)
    args = ncsn.parse_args(["--epochs", "200"])
    assert (args.epochs == 200 and args.preset == "ncsnv2" and args.lr == 1e-4
            and args.data == "cifar10")
    assert (args.num_scales == 232 and args.sigma_max == 50 and args.ema == 0.999
            and args.score_param == "divide")
    requirements = (ROOT / "requirements.txt").read_text()
    for package in ("torch", "torchvision", "numpy", "matplotlib", "tqdm", "torch-fidelity",
                    "tensorboard", "pytest"):
        assert f"\n{package}" in "\n" + requirements


SHELL_VARIABLES = {"JPEG": "cifar10", "DATA": "cifar10", "s": "1", "K": "1000"}  # loop variables
FENCED = re.compile(r"^```\w*\n(.*?)^```", re.S | re.M)  # a Markdown code block


def commands_in(text, variables):
    """The commands (argv lists: a script or `-m module`, then its arguments) in shell lines: `\\`
    continuations joined, NAME="..." assignments remembered and $NAME expanded, a line cut at &&,
    ;, | and &, and `!`, env prefixes, `timeout N` and `...` dropped."""
    out = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), line.strip())
        if assignment := re.fullmatch(r"(\w+)=(\"[^\"]*\"|\S*)", line):
            variables[assignment[1]] = assignment[2].strip('"')
        elif re.search(r"(^|[!\s])(python|torchrun) ", line):
            segment = []
            for word in [*shlex.split(line.lstrip("!"), comments=True), "&&"]:
                if word not in ("&&", ";", "|", "||", "&"):
                    segment.append(word)
                    continue
                while segment and re.fullmatch(r"[A-Z_]+=\S*|timeout|\d+", segment[0]):
                    segment = segment[1:]
                if segment[:1] == ["torchrun"]:  # torchrun's own flags, then the script
                    segment = ["python", *next((segment[i:] for i, w in enumerate(segment)
                                                if w.endswith(".py")), [])]
                if segment[:1] == ["python"] and segment[1:2] != ["-c"] \
                        and segment[1:3] != ["-m", "pytest"] and len(segment) > 1:
                    out.append([w for w in segment[1:] if w != "..."])
                segment = []
    return out


def recorded_commands(node, key=""):
    """The strings under "command" keys of a results file (and vae_aasae.json's probe_commands;
    its train_commands are as they ran, when vae.py had --preset aasae and --preset vae:
    experiments/README.md, "AASAE", says so)."""
    if isinstance(node, dict):
        return [c for k, v in node.items()
                for c in recorded_commands(v, "command" if key == "probe_commands" else k)]
    if isinstance(node, list):
        return [c for v in node for c in recorded_commands(v, key)]
    return [node] if key == "command" else []


def documented_commands():
    """(where, argv) of every command the repository prints for its reader: README.md's and
    experiments/README.md's code (fenced blocks with their shell variables, and inline code), the
    usage lines of each script's docstring, and the commands experiments/results/ recorded."""
    found = []
    for name in ("README.md", "experiments/README.md"):
        text, variables = (ROOT / name).read_text(), dict(SHELL_VARIABLES)
        for block in FENCED.findall(text):
            found += [(name, argv) for argv in commands_in(block, variables)]
        prose = FENCED.sub("", text)
        for span in re.findall(r"`((?:python|torchrun) [^`\n]+)`", prose):
            found += [(name, argv) for argv in commands_in(span, dict(SHELL_VARIABLES))]
    for path in [*ROOT.glob("*.py"), *ROOT.glob("experiments/*.py"), ROOT / ".ci" / "gpu"]:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        usage = "\n".join(line for line in re.sub(r"\\\n\s*", " ", doc).splitlines()
                          if re.match(r"\s+(\w+=\S+ )*(python|torchrun) ", line))
        found += [(path.relative_to(ROOT).as_posix(), argv)
                  for argv in commands_in(usage, dict(SHELL_VARIABLES))]
    for path in (ROOT / "experiments" / "results").rglob("*.json"):
        lines = recorded_commands(json.loads(path.read_text()))
        found += [(path.relative_to(ROOT).as_posix(), argv)
                  for argv in commands_in("\n".join(lines), dict(SHELL_VARIABLES))]
    # `python <model>.py ...` stands for each of the three
    return [(where, [argv[0].replace("<model>", m), *argv[1:]]) for where, argv in found
            for m in (MODELS if "<model>" in argv[0] else ["<model>"])]


class Parsed(Exception):
    """Raised in place of what a script does once argparse has accepted its command line."""


def anchors(markdown):
    """The #anchors a Markdown page has on GitHub: each heading's slug (lower case, punctuation
    dropped, spaces as hyphens; a repeated one gets -1, -2, ...) and each <a id="...">."""
    text = FENCED.sub("", markdown)
    found = set(re.findall(r'<a id="([^"]+)">', text))
    for heading in re.findall(r"^#+ (.*)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(next(s for s in (slug, *(f"{slug}-{i}" for i in range(1, 99))) if s not in found))
    return found


def test_readme_links_and_the_result_files_they_cite_exist():
    """Every relative link in README.md, experiments/README.md and runs/README.md reaches a file of
    the repository (a figure, a script, a page) and, with #anchor, a heading of it; every
    experiments/results/ file they name (in code too) exists. Bug it catches: a figure or result
    file renamed, moved or never committed, a heading reworded under a table of contents that
    still points at it: the reader who follows the link finds nothing."""
    broken, followed, page_anchors = [], 0, {}
    for page in (ROOT / "README.md", ROOT / "experiments" / "README.md", ROOT / "runs/README.md"):
        text = FENCED.sub("", page.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if not re.match(r"https?://", target):
                path, _, anchor = target.partition("#")
                followed += 1
                dest = (page.parent / path).resolve() if path else page
                if anchor and dest.is_file() and dest not in page_anchors:
                    page_anchors[dest] = anchors(dest.read_text())
                if not dest.is_file() or anchor and anchor not in page_anchors[dest]:
                    broken.append(f"{page.relative_to(ROOT)}: ({target})")
        for cited in re.findall(r"experiments/results/[\w./-]*\w", page.read_text()):
            followed += 1
            if not (ROOT / cited).exists():
                broken.append(f"{page.relative_to(ROOT)}: {cited}")
    assert not broken, "\n".join(broken)
    assert followed > 50  # the contents' anchors, the figures, the result files
    assert "the-mutation-sweep-do-the-tests-catch-real-bugs" in anchors(
        (ROOT / "experiments" / "README.md").read_text())


@pytest.mark.filterwarnings("ignore:.*found in sys.modules")  # (runpy: -m of an imported module)
def test_every_documented_command_parses(monkeypatch):
    """Each command that README.md, experiments/README.md, a script's docstring or a recorded result
    prints is accepted by its script's argparse (flag names, types, choices, subcommands): the
    script runs in this process until its first parse_args returns. Bug it catches: a flag renamed
    or dropped, or a script moved, while the documentation (or the record beside a number) still
    prints the old command, which then fails for every reader who copies it."""
    commands = documented_commands()
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.chdir(ROOT)
    failed, checked = [], set()
    for where, argv in commands:
        if (key := tuple(argv)) in checked:
            continue
        checked.add(key)
        monkeypatch.setattr(sys, "argv", [argv[0], *argv[2 if argv[0] == "-m" else 1:]])
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
                if argv[0] == "-m":
                    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
            failed.append(f"{where}: {shlex.join(argv)}: never parsed its arguments")
        except Parsed:
            pass
        except (SystemExit, Exception) as e:
            why = errors.getvalue().strip().splitlines()[-1:] or [f"{type(e).__name__}: {e}"]
            failed.append(f"{where}: {shlex.join(argv)}: {why[0]}")
    assert not failed, "\n".join(failed)
    # the extraction found them all: the headline run, a harness, a recorded result, torchrun
    assert len(checked) > 100 and {("ncsn.py", "--epochs", "200"), (".ci/gpu", "--cpu-smoke"),
                                   ("-m", "experiments.ncsn_laptop", "report"),
                                   ("vae.py", "--eval", "runs/RUN", "--no-amp")} <= checked
    assert any(argv[:2] == ["-m", "experiments.likelihood"] and "--ais-steps" in argv
               for where, argv in commands if where == "experiments/results/equal_time.json")


@pytest.mark.skipif(not REAL_DATA.exists(),
                    reason="the shared CIFAR-10 JPEG copy is not on this machine")
def test_explore_on_real_cifar10_copy(tmp_path):
    stats = common.explore(str(REAL_DATA), str(ROOT / "data"), tmp_path)
    assert stats["train_images"] == 50000 and stats["test_images"] == 10000
    assert set(stats["images_per_class"].values()) == {5000}
    assert all(0.4 < m < 0.55 for m in stats["channel_mean"])


# ------------------------------------------------------------------------------------------------
# The contract every model script keeps (SPEC.md), tested on all three with the same tests
# ------------------------------------------------------------------------------------------------

def checkpoints_equal(a, b):
    """Every tensor of two checkpoints (weights, EMA, optimiser moments, the model's state) bit for
    bit, and the same optimiser settings and loss-scaler state. Bug the last catches: a resume that
    does not restore the scaler (its step counts start again; under float16 its scale too)."""
    def tensors(ckpt):
        out = {f"{key}.{name}": t for key in ("net", "ema") for name, t in ckpt[key].items()}
        out.update({f"optimizer.{i}.{k}": t for i, s in ckpt["optimizer"]["state"].items()
                    for k, t in s.items()})
        return {**out, **{f"state.{k}": t for k, t in ckpt["state"].items()
                          if isinstance(t, torch.Tensor)}}

    ta, tb = tensors(a), tensors(b)
    return (ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
            and a["scaler"] == b["scaler"]
            and a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"])


def epochs_logged(run):
    """(step, epoch) of every row of metrics.jsonl, in order."""
    return [(r["step"], r.get("epoch")) for r in common.read_metrics(run)]


@pytest.fixture(scope="module", params=list(MODELS))
def trained(request, tiny_images, tmp_path_factory):
    """For each model: 2 epochs in one go, and 1 epoch, then --resume to 2 (in-process: main(argv)
    is the program)."""
    model, tmp = request.param, tmp_path_factory.mktemp(request.param)
    module = MODELS[model]
    full = module.main(train_args(model, tiny_images, tmp / "a", "--epochs", 2))
    half = module.main(train_args(model, tiny_images, tmp / "b", "--epochs", 1))
    shutil.copytree(half, tmp / "after_one_epoch")
    assert module.main(["--resume", str(half), "--epochs", "2"]) == half
    return model, module, full, half, tmp


def test_train_writes_the_run_folder(trained):
    model, _, full, _, _ = trained
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json", "metrics.png",
                 "lock", "samples/epoch_0001.png", "samples/epoch_0002.png"):
        assert (full / name).exists(), name
    assert list(full.glob("events.out.tfevents.*")) and not list(full.glob("*.tmp"))
    config = json.loads((full / "config.json").read_text())
    assert config["args"]["epochs"] == 2 and config["torch"] == torch.__version__
    assert full.name.startswith(f"{model}__default__1__")
    ckpt = torch.load(full / "checkpoint.pt", weights_only=True)
    # 64 images, 16 per step
    assert ckpt["model"] == model and ckpt["epoch"] == 2 and ckpt["step"] == 8
    assert ckpt["precision"] == "None"  # float32 on the CPU
    summary = json.loads((full / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 8 and summary["parameters"] > 0


def test_resume_is_bit_identical_and_logs_each_epoch_once(trained):
    _, _, full, half, _ = trained
    a, b = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (full, half))
    assert a["step"] == b["step"] == 8 and a["epoch"] == b["epoch"] == 2
    assert checkpoints_equal(a, b)
    # the resumed log reads as if it had never stopped
    assert epochs_logged(half) == epochs_logged(full)


def test_a_learning_rate_given_on_resume_wins(trained, tmp_path):
    """`--resume RUN --epochs 2 --lr X` trains on at X, not at the lr the saved optimiser holds. Bug
    it catches: the flag silently ignored (config.json would even record X)."""
    model, module, _, _, tmp = trained
    run = tmp_path / "run"
    shutil.copytree(tmp / "after_one_epoch", run)
    module.main(["--resume", str(run), "--epochs", "2", "--lr", "7e-4"])
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    args = argparse.Namespace(**ckpt["args"])  # the VAE's lr follows its warm-up from --lr
    expected = vae.schedule(ckpt["step"] - 1, 4, args)[0] if model == "vae" else 7e-4
    assert args.lr == 7e-4 and ckpt["optimizer"]["param_groups"][0]["lr"] == expected


def test_a_checkpoint_from_the_gpu_resumes_on_the_cpu(trained):
    """On CUDA the networks are channels_last, and so are the optimiser's moments in the checkpoint;
    the CPU's fused Adam assumes a moment is laid out like its weight, so it must be converted on
    load, not misread."""
    model, module, full, _, tmp = trained
    gpu_like = tmp / "gpu_like"
    shutil.copytree(tmp / "after_one_epoch", gpu_like)
    ckpt = torch.load(gpu_like / "checkpoint.pt", weights_only=True)
    to_cl = lambda t: t.to(memory_format=torch.channels_last) if t.dim() == 4 else t  # noqa: E731
    for key in ("net", "ema"):
        ckpt[key] = {k: to_cl(t) for k, t in ckpt[key].items()}
    ckpt["optimizer"]["state"] = {i: {k: to_cl(t) for k, t in s.items()}
                                  for i, s in ckpt["optimizer"]["state"].items()}
    assert any(not t.is_contiguous() for s in ckpt["optimizer"]["state"].values()
               for t in s.values())
    torch.save(ckpt, gpu_like / "checkpoint.pt")
    module.main(["--resume", str(gpu_like), "--epochs", "2"])
    assert checkpoints_equal(torch.load(gpu_like / "checkpoint.pt", weights_only=True),
                             torch.load(full / "checkpoint.pt", weights_only=True))


def test_a_run_resumes_in_another_precision_in_both_directions(trained, monkeypatch):
    """Train on one card, resume on another: float32 (CPU, bf16 GPUs) to float16 (T4, V100) and
    back. Bug it catches: the scaler's saved state loaded into a scaler of another precision
    (a disabled scaler saved {}: RuntimeError 'The source state dict is empty'; a float32 scaler
    would hand float16 a scale of 1 that never grows). Float16 autocast and its scaler run on the
    CPU too."""
    model, module, _, _, tmp = trained
    run = tmp / "precision"
    shutil.copytree(tmp / "after_one_epoch", run)
    monkeypatch.setattr(module, "write_previews", lambda *args: None)  # (float16 on a CPU: 26 s)
    monkeypatch.setattr(module, "amp_dtype", lambda args, device: torch.float16)
    # float32 -> float16: a fresh float16 scaler
    module.main(["--resume", str(run), "--epochs", "2"])
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["precision"] == "torch.float16" and ckpt["epoch"] == 2
    assert ckpt["scaler"]["scale"] <= 2.0**16 and ckpt["scaler"]["growth_interval"] == 2000
    assert all(torch.isfinite(t).all() for t in ckpt["net"].values())
    monkeypatch.setattr(module, "amp_dtype", lambda args, device: None)
    # float16 -> float32: the scale starts at 1
    module.main(["--resume", str(run), "--epochs", "3"])
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["precision"] == "None" and ckpt["scaler"]["scale"] == 1.0 and ckpt["epoch"] == 3


def test_a_crash_before_the_save_leaves_no_trace_after_resume(trained, monkeypatch):
    """A crash after epoch 2 was logged but before its checkpoint was renamed into place
    (a kill during the save leaves checkpoint.pt.tmp): after --resume there is no stray file and
    every epoch is logged once, in metrics.jsonl and in TensorBoard (bug: the log's rows after the
    checkpoint kept, or TensorBoard's points; TensorBoard drops a point whose step goes back by
    itself, but not one logged again at the same step)."""
    model, module, full, _, tmp = trained
    crashed = tmp / "crashed"
    shutil.copytree(tmp / "after_one_epoch", crashed)
    save = module.save_checkpoint

    def killed_during_the_save(run_dir, **state):
        if state["epoch"] == 2:
            (run_dir / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
            raise KeyboardInterrupt
        save(run_dir, **state)

    monkeypatch.setattr(module, "save_checkpoint", killed_during_the_save)
    with pytest.raises(KeyboardInterrupt):
        module.main(["--resume", str(crashed), "--epochs", "2"])
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "epoch": 2, "lo')  # and a row cut off by the kill
    monkeypatch.setattr(module, "save_checkpoint", save)
    # (the same process: its own lock is let go)
    module.main(["--resume", str(crashed), "--epochs", "2"])
    assert not list(crashed.glob("*.tmp"))
    assert epochs_logged(crashed) == epochs_logged(full)
    # TensorBoard too: the killed run's points past the checkpoint's step 4 are purged
    board = EventAccumulator(str(crashed)).Reload()
    assert [e.step for e in board.Scalars("epoch_seconds")] == [4, 8]
    assert checkpoints_equal(torch.load(crashed / "checkpoint.pt", weights_only=True),
                             torch.load(full / "checkpoint.pt", weights_only=True))


def test_a_run_folder_has_one_writer_at_a_time(trained, tiny_images, tmp_path):
    """Two processes resuming one run (a second terminal, a re-submitted job) used to race for
    checkpoint.pt.tmp and log an epoch twice. Bug it catches: no lock, or a lock that a killed
    process leaves behind (the lock is the system's: it dies with its process)."""
    model, _, _, _, tmp = trained
    run = tmp_path / "run"
    shutil.copytree(tmp / "after_one_epoch", run)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); f.write('4242'); "
                               "f.flush(); print('locked', flush=True); time.sleep(60)",
                               str(run / "lock")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    before = folder_digest(run)
    proc = run_script(f"{model}.py", "--resume", run, "--epochs", 2, check=False)
    assert (proc.returncode == 1
            and proc.stderr.strip().endswith("is being written by process 4242: one writer "
                                             "at a time")), proc.stderr
    assert folder_digest(run) == before  # refused before anything was written
    holder.kill()
    holder.wait()  # killed: its lock goes with it, and the file that names it stays
    run_script(f"{model}.py", "--resume", run, "--epochs", 2)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2


RANKS_AGREE = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
import torch.distributed as dist
import {model} as module
from experiments.torchrun_exit import gloo_threads_left
{patch}
built, build = [], module.build
module.build = lambda *args: built.append(build(*args)) or built[-1]  # keeps the network
module.main(sys.argv[2:])
weights = torch.cat([p.detach().flatten() for p in built[0][0].parameters()])
every = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
dist.all_gather(every, weights)
if dist.get_rank() == 0:
    print("ranks agree" if all(torch.equal(w, weights) for w in every) else "ranks differ")
dist.destroy_process_group()  # gloo's threads end with it
print(f"gloo threads left: {{gloo_threads_left()}}")
"""


def test_two_process_torchrun_resume_is_bit_identical(trained, tiny_images, tmp_path):
    """Under torchrun each rank draws its own noise from (seed, rank, epoch), so resume is exact
    there too; the ranks end with the same weights; and destroy_process_group ends gloo's threads.
    Bugs that catches: the step calling the network, not its DDP wrapper (no gradient is averaged:
    each rank trains alone on its shard, rank 0 saves its own, and resume is still exact); and
    torch.distributed.nn imported after the group (by DDP): its functions' defaults hold the group,
    its threads outlive destroy_process_group, and one of them, releasing the last all_gather's
    tensors during the interpreter's exit, aborts a finished run now and then (SIGABRT): 3 threads
    left on each rank (0 on a machine without /proc, where the count cannot fail)."""
    model = trained[0]
    (tmp_path / "agree.py").write_text(RANKS_AGREE.format(model=model, patch=""))
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2", str(tmp_path / "agree.py"), str(ROOT),
                               *train_args(model, tiny_images, tmp_path / name,
                                           "--epochs", epochs)],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, epochs in (("full", 2), ("half", 1))]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert out.count("parameters,") == 1  # rank 0 alone prints, logs and saves
        assert "ranks agree" in out and out.count("gloo threads left: 0") == 2
    full, half = only_run(tmp_path / "full" / "runs"), only_run(tmp_path / "half" / "runs")
    run_script(f"{model}.py", "--resume", half, "--epochs", 2, torchrun=True)
    a, b = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (full, half))
    assert a["step"] == b["step"] == 8  # 64 images, 8 per rank per step: 4 steps an epoch
    assert checkpoints_equal(a, b)


FAIL_ON_RANK_0 = """
import sys
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
import {model} as module

def full_disk(run_dir, **state):
    raise OSError(28, "No space left on device")

module.save_checkpoint = full_disk  # rank 0 alone saves: it alone fails
try:
    module.main(sys.argv[2:])
except Exception as e:
    sys.exit(f"rank {{dist.get_rank()}}: {{type(e).__name__}}: {{e}}")
"""


def test_a_failure_on_rank_0_stops_every_process_at_once(trained, tiny_images, tmp_path):
    """Rank 0 alone evaluates and saves at the end of an epoch, while the others wait at a barrier.
    Bug it catches: the others waiting there for the 30-minute collective timeout after rank 0 died
    (a full disk). torchrun's agent stops every process once one has failed (measured: the 2-process
    job ends within seconds), and rank 0's error is what it reports."""
    model = trained[0]
    (tmp_path / "fail.py").write_text(FAIL_ON_RANK_0.format(model=model))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(tmp_path / "fail.py"), str(ROOT),
                           *train_args(model, tiny_images, tmp_path, "--epochs", 2)],
                          env=ENV, capture_output=True, text=True, timeout=240)
    assert (proc.returncode != 0
            and "rank 0: OSError: [Errno 28] No space left on device" in proc.stderr)
    # a hang would last until the collective's 30-minute timeout
    assert time.perf_counter() - start < 180


def fails_cleanly(module, argv, text, capsys):
    """The script's answer to bad input: one line naming the problem (a UserError, which the script
    prints as one line, or argparse's own one line) and a non-zero exit."""
    capsys.readouterr()
    try:
        module.main([str(a) for a in argv])
    except common.UserError as e:
        message = str(e)
    except SystemExit as e:  # argparse printed "prog: error: ..." and exits with status 2
        assert e.code == 2
        message = capsys.readouterr().err.strip()
    else:
        raise AssertionError(f"{argv} did not fail")
    assert message and "\n" not in message and text in message, (argv, message)


def test_bad_inputs_fail_with_one_clear_line_and_leave_runs_intact(trained, tiny_images,
                                                                   tmp_path, capsys):
    model, module, full, _, _ = trained
    run = tmp_path / "run"
    shutil.copytree(full, run)
    before = folder_digest(run)
    broken = {}
    # "random" starts as a pickle of protocol 157 would: torch warned about it before our one line
    for name, payload in (("cut", (run / "checkpoint.pt").read_bytes()[:1000]),
                          ("random", b"\x80\x9d" + random.Random(0).randbytes(4998))):
        broken[name] = tmp_path / name
        broken[name].mkdir()
        shutil.copy(run / "config.json", broken[name])
        (broken[name] / "checkpoint.pt").write_bytes(payload)
    broken["code"] = tmp_path / "code"
    shutil.copytree(broken["cut"], broken["code"], dirs_exist_ok=True)
    # a pickle with an object
    torch.save({"model": model, "payload": Path("x")}, broken["code"] / "checkpoint.pt")
    broken["other"] = tmp_path / "other"
    shutil.copytree(broken["cut"], broken["other"], dirs_exist_ok=True)
    torch.save({"model": "another"}, broken["other"] / "checkpoint.pt")
    broken["partial"] = tmp_path / "partial"
    shutil.copytree(broken["cut"], broken["partial"], dirs_exist_ok=True)
    # e.g. saved by another tool
    torch.save({"model": model, "net": {}}, broken["partial"] / "checkpoint.pt")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "0.png").write_bytes(b"not an image")
    fresh = lambda *extra: train_args(model, tiny_images, tmp_path, *extra)  # noqa: E731
    cases = [
        (fresh("--epochs", 0), "epochs"),
        (fresh("--batch-size", -1), "batch-size"),
        (fresh("--grad-clip", -1), "grad-clip"),
        (fresh("--name", "a/b"), "a name, not a path"),
        (fresh("--name", "../../../x"), "a name, not a path"),
        (fresh("--data", tmp_path / "missing"), "no such folder"),
        (fresh("--data", tmp_path / "a_file"), "a file, not a folder"),
        (fresh("--data", tmp_path / "junk"), "could be read"),
        (fresh("--data-root", tmp_path / "a_file"), "--data-root"),
        (fresh("--run-dir", tmp_path / "a_file"), "--run-dir"),
        (fresh("--ema", 1.5), "--ema: must be in [0, 1), got 1.5"),
        (["--resume", run, "--epochs", 2], "already has 2 epochs"),
        (["--sample", run, "--width", 16], "another width or architecture"),
        (["--sample", tmp_path / "missing"], "not a run folder"),
        (["--sample", broken["cut"]], "corrupt or truncated"),
        (["--sample", broken["random"]], "corrupt or truncated"),
        (["--sample", broken["code"]], "pickled objects other than tensors (refused)"),
        (["--sample", broken["other"]], f"not a checkpoint of {model}.py"),
        (["--sample", broken["partial"]], "is an incomplete checkpoint (no args, "),
        (["--resume", broken["partial"], "--epochs", 5], "is an incomplete checkpoint"),
    ] + {"ncsn": [(fresh("--sigma-min", 60),
                   "the noise anneals from --sigma-max down to --sigma-min"),
                  (fresh("--num-scales", 1), "--num-scales >= 2 levels; got 50, 0.01, 1")],
         "vae": [(fresh("--latent-size", 5), "latent-size")],
         "ebm": [(fresh("--restart-rate", 1.5), "restart-rate"),
                 (fresh("--buffer-size", 8), "--buffer-size at least --batch-size")]}[model]
    for argv, text in cases:
        fails_cleanly(module, argv, text, capsys)
    assert folder_digest(run) == before  # nothing in the run was touched
    # no half-made run folder
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
    # nothing outside --run-dir
    assert not list(tmp_path.glob("x*")) and not (tmp_path / "runs" / "a").exists()
    # and as a real process
    proc = run_script(f"{model}.py", "--sample", broken["random"], check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == f"{model}.py: error: cannot load " \
        f"{broken['random']}/checkpoint.pt: corrupt or truncated", proc.stderr


def test_eval_checks_the_metrics_before_it_samples(trained, tmp_path, monkeypatch, capsys):
    """--eval samples for hours on a GPU before FID; a missing or broken --fid-weights file, an
    unknown extractor or --n 1 used to fail only after that (keeping nothing, the VAE's test bound
    and IWAE included). Bug it catches: the check after the sampling, or no check of the file."""
    model, module, full, _, _ = trained
    run = tmp_path / "run"
    shutil.copytree(full, run)
    monkeypatch.setattr(module, "draw_samples", lambda *a, **k: pytest.fail("sampled first"))
    monkeypatch.setattr(module, "test_metrics", lambda *a, **k: pytest.fail("evaluated first"))
    (tmp_path / "garbage.pth").write_text("garbage\n")
    missing = tmp_path / "missing.pth"
    for argv, text in [(["--n", 1], "--n: need at least 2 samples"),
                       (["--fid-weights", missing], f"--fid-weights {missing}: not a readable "),
                       (["--fid-weights", tmp_path / "garbage.pth"], "not a readable weights file"),
                       (["--fid-extractor", "no-such-net"], "--fid-extractor no-such-net: not")]:
        fails_cleanly(module, ["--eval", run, *argv], text, capsys)
    assert not (run / "eval.json").exists()


@pytest.mark.parametrize("model", list(MODELS))
def test_mixed_precision_follows_what_the_gpu_supports(model, monkeypatch):
    """bf16 where the GPU has it natively (compute capability 8+), float16 on a T4 or V100 (7.x),
    which would only emulate bf16, and float32 on older cards (Pascal, 6.x), where float16 is slower
    than float32; float32 on the CPU and with --no-amp. Every scaler is on (it skips non-finite
    steps); only float16's scales."""
    module = MODELS[model]
    args = module.parse_args([])
    cuda = torch.device("cuda")
    for capability, dtype in (((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                              ((7, 5), torch.float16), ((7, 0), torch.float16),
                              ((6, 1), None), ((5, 2), None)):
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None, c=capability: c)
        assert module.amp_dtype(args, cuda) == dtype, capability
    assert module.amp_dtype(args, torch.device("cpu")) is None
    assert module.amp_dtype(module.parse_args(["--no-amp"]), cuda) is None
    *_, scaler = module.build(module.parse_args(TINY[model]), torch.device("cpu"))
    assert scaler.is_enabled() and scaler.get_scale() == 1.0
    assert module.grad_scaler(torch.device("cpu"), torch.float16).get_scale() == 2.0**16


@pytest.mark.parametrize("model", list(MODELS))
def test_a_non_finite_step_is_skipped_with_any_optimiser(model, tiny_images, tmp_path, monkeypatch):
    """The skip is torch.amp.GradScaler's public step(): it works with the fused Adam and with
    whatever a student swaps in. Bug it catches: the skip through the fused kernel's private
    found_inf (a non-fused Adam raised an AssertionError when it was set; SGD would have stepped on
    NaN)."""
    module = MODELS[model]
    for make in (lambda p: torch.optim.Adam(p, lr=1e-3),
                 lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)):
        torch.manual_seed(0)
        args = module.parse_args(train_args(model, tiny_images, tmp_path))
        net, _, _, scaler = module.build(args, torch.device("cpu"))
        optimizer = make(net.parameters())
        before = [p.detach().clone() for p in net.parameters()]
        x = torch.full((16, 3, 32, 32), math.nan)
        step = {
            "ncsn": lambda: ncsn.train_step(
                net, net, optimizer, scaler, x, torch.tensor([1.0, 0.1]), args, None),  # noqa: B023
            "vae": lambda: vae.train_step(
                net, net, optimizer, scaler, x, 1.0, args,  # noqa: B023
                {"grad_norm_avg": torch.tensor(math.inf), "clipped_outliers": torch.tensor(0)},
                None),
            "ebm": lambda: ebm.train_step(
                net, net, optimizer, scaler,  # noqa: B023
                ebm.ReplayBuffer(64, (3, 32, 32), "cpu"), x, args, None)}[model]  # noqa: B023
        logs, bad = step()
        assert bad and all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.parametrize("model", list(MODELS))
def test_training_reads_tensors_on_the_host_per_epoch_not_per_step(model, tiny_images, tmp_path,
                                                                   monkeypatch):
    """Between two logs nothing in training turns a tensor into a Python number (.item(), float(),
    bool(), ...): on a GPU each is a host sync. An epoch of 4 steps and one of 8, with no log
    between, read the same number of tensors. Bug it catches: the VAE's clip to a bound held on the
    device through clip_grad_norm_, which calls float() on it every step (found by .ci/gpu's
    set_sync_debug_mode on an H200; on the CPU this count stands in for it)."""
    reads = []

    def counted(read):
        def counting(self, *args):
            reads.append(read)
            return read(self, *args)
        return counting

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    counts = []
    for images in (32, 64):
        reads.clear()
        argv = train_args(model, tiny_images, tmp_path / str(images), "--epochs", 1,
                          "--limit-train", images, "--batch-size", 8, "--log-every", 99)
        MODELS[model].main(argv)
        counts.append(len(reads))
    assert counts[0] == counts[1] > 0, counts


@pytest.mark.parametrize("model", list(MODELS))
def test_skipped_steps_leave_the_loss_scale_alone_outside_float16(model):
    """In float32 and bf16 the scaler only skips steps: 300 of them in a run leave its scale near 1,
    and the next good step is exact. Bug it catches: GradScaler's default backoff, which halves the
    scale at each skipped step (2^-150 is 0 in float32: the next gradient unscaled to NaN, the
    weights NaN). Float16's scaler still halves (its scale must leave overflow)."""
    def train(dtype, factors):
        weight = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.SGD([weight], lr=1.0)
        scaler = MODELS[model].grad_scaler(torch.device("cpu"), dtype)
        for factor in factors:
            optimizer.zero_grad()
            scaler.scale((weight * torch.tensor([1e-3, 1e-20, 0.0]) * factor).sum()).backward()
            scaler.step(optimizer)
            scaler.update()
        return weight.detach(), scaler.get_scale()

    weight, scale = train(None, [math.nan] * 300 + [1.0])
    assert scale > 0.99 and torch.equal(weight, 1 - torch.tensor([1e-3, 1e-20, 0.0]))
    assert train(torch.float16, [math.nan])[1] == 2.0**15


@pytest.mark.parametrize("model", list(MODELS))
def test_the_benchmark_times_what_training_runs(model, tmp_path):
    out = run_script("experiments/bench.py", model, "--run-dir", tmp_path, "--device", "cpu",
                     *TINY[model], "--repeats", 1)
    saved = json.loads((only_run(tmp_path) / "bench.json").read_text())
    assert saved["precision"] == "float32" and saved["model"] == model  # the CPU: no autocast
    assert (saved["train_images_per_s"] > 0 and saved["parameters"] > 0
            and saved["projected_hours_200_epochs"] > 0)
    assert saved["network_evaluations_per_s"] > 0 and saved["nfe_per_sample"] >= 1
    assert only_run(tmp_path).name.startswith(f"{model}-bench__") and "bench.json" in out.stdout


@pytest.mark.parametrize("model", list(MODELS))
def test_every_epoch_draws_its_own_noise(model, tiny_images, tmp_path, monkeypatch):
    """Each epoch reseeds from (seed, rank, epoch): resume is exact, and epochs differ. The random
    state at the first step of epochs 1 and 2 must differ. Bug it catches:
    the epoch left out of the reseed (each epoch then replays the same noise levels, eps or SGLD
    noise; resume stays bit-identical, so the resume tests cannot see it)."""
    module, states = MODELS[model], []
    train_step = module.train_step

    def recording(*args, **kwargs):
        states.append(torch.random.get_rng_state())
        return train_step(*args, **kwargs)

    monkeypatch.setattr(module, "train_step", recording)
    module.main(train_args(model, tiny_images, tmp_path, "--epochs", 2, "--limit-train", 16,
                           "--limit-test", 16))
    assert len(states) == 2 and not torch.equal(states[0], states[1])


@pytest.mark.parametrize("model, loss", [("vae", "training_loss"), ("ncsn", "dsm_loss")])
def test_only_bad_steps_in_a_row_stop_a_run(model, loss, tiny_images, tmp_path,
                                            monkeypatch):
    """--max-bad-steps counts non-finite steps in a row: every second of 8 steps diverging never
    reaches 2 in a row, and the run ends normally; two in a row stop it. Bug it catches: bad steps
    counted in total (streak + bad), which stops a run that recovers from each bad step."""
    module, calls = MODELS[model], []
    original = getattr(module, loss)

    def every_second_step_diverges(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs) * (math.nan if len(calls) % 2 == 0 else 1.0)

    monkeypatch.setattr(module, loss, every_second_step_diverges)
    argv = train_args(model, tiny_images, tmp_path, "--epochs", 2, "--max-bad-steps", 2,
                      "--log-every", 1, "--limit-test", 16)
    assert module.main(argv).exists()  # 4 bad steps of 8, never two in a row
    monkeypatch.setattr(module, loss, lambda *a, **k: original(*a, **k) * math.nan)
    with pytest.raises(common.UserError, match="training diverged"):
        module.main([*argv, "--name", "all_bad"])


@pytest.mark.parametrize("model", list(MODELS))
def test_ema_update_moves_the_average_a_tenth_of_the_way_at_decay_0_9(model):
    """ema <- d ema + (1 - d) net in every model file (ncsn's own test covers only ncsn.py). Bug it
    catches: the decay applied the wrong way round (lerp by d: the average is 90% the new weights,
    nearly no average at all), which training, resume and samples all run through unnoticed."""
    net, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2).requires_grad_(False)
    old = [p.clone() for p in ema.parameters()]
    MODELS[model].update_ema(ema, net, 0.9, step=10**6)  # long after the warm-up: d = decay
    assert all(torch.allclose(e, 0.9 * o + 0.1 * p)
               for e, o, p in zip(ema.parameters(), old, net.parameters()))


# ------------------------------------------------------------------------------------------------
# ncsn.py: math with known answers
# ------------------------------------------------------------------------------------------------

def gaussian_score(mu, var):
    """The exact score of N(mu, var) (diagonal) convolved with N(0, sigma^2 I):
    -(x - mu) / (var + sigma^2)."""
    return lambda x, sigma: -(x - mu) / (var + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2)


def test_ncsn_dsm_loss_of_the_exact_score_reaches_the_closed_form_minimum():
    torch.manual_seed(0)
    n, d, mu, s2 = 100_000, 3, 2.0, 0.5**2
    x = mu + s2**0.5 * torch.randn(n, d)
    sigmas = torch.tensor([0.3, 1.0, 3.0])
    for level, sigma in enumerate(sigmas):
        levels = torch.full((n,), level)
        exact = ncsn.dsm_loss(gaussian_score(mu, s2), x, sigmas, levels).mean()
        minimum = 0.5 * d * s2 / (s2 + sigma**2)  # 1/2 D s^2 / (s^2 + sigma^2)
        assert exact.item() == pytest.approx(minimum.item(), rel=0.02)
        worse = ncsn.dsm_loss(lambda x, s: 1.2 * gaussian_score(mu, s2)(x, s), x, sigmas,
                              levels).mean()
        assert worse > exact + 0.01


def test_ncsn_final_denoising_step_is_the_posterior_mean():
    torch.manual_seed(0)
    mu, s2, sigma = torch.tensor([1.0, -2.0]), 0.7, torch.tensor(0.4)
    y = mu + (s2 + sigma**2) ** 0.5 * torch.randn(1000, 2)  # noisy observations of N(mu, s2 I)
    posterior_mean = mu + s2 / (s2 + sigma**2) * (y - mu)
    assert torch.allclose(ncsn.finish(gaussian_score(mu, s2), y, sigma, True),
                          posterior_mean, atol=1e-6)


# per-dimension data std: below sigma_L (like the directions across the image manifold)
TIGHT, WIDE = 0.005, 0.3


def gaussian_data(dims=64):
    """N(mu, diag(std^2)): half the dimensions tight, half wide, means spread over [0.2, 0.8]; its
    exact score, and the statistics the samplers start from (mean and covariance)."""
    std = torch.cat([torch.full((dims // 2,), TIGHT), torch.full((dims // 2,), WIDE)])
    mu = torch.linspace(0.2, 0.8, dims)
    return mu, std, gaussian_score(mu, std**2), {"mean": mu, "cov": torch.diag(std**2)}


def sample_gaussian(argv, n=2000, seed=0):
    """(mean error, spread / truth in the tight and the wide directions, nfe) of ncsn.py's sampler
    for argv."""
    mu, std, score, stats = gaussian_data()
    args = ncsn.parse_args([*argv, "--batch-size", str(n)])
    torch.manual_seed(seed)
    x, nfe = ncsn.draw_samples(score, stats, n, args, torch.device("cpu"), None)
    sigma_l = args.sigma_min  # without denoising the chains approach p_sigma_L
    ratio = x.std(0) / ((std**2 + sigma_l**2).sqrt() if not args.denoise
                        else std**2 / (std**2 + sigma_l**2).sqrt())
    half = len(mu) // 2
    return ((x.mean(0) - mu).abs().max().item(), ratio[:half].mean().item(),
            ratio[half:].mean().item(), nfe)


@pytest.mark.parametrize("argv, nfe, spread", [(["--sampler", "ode", "--nfe", "100"], 100, 0.02),
                                               (["--sampler", "ode", "--nfe", "18",
                                                 "--preset", "ncsn2019"], 18, 0.05)])
def test_ncsn_ode_sampler_draws_the_gaussian_with_its_mean_and_spread(argv, nfe, spread):
    """The probability-flow ODE is exact up to Heun's error (measured 1.002 / 1.006 at 100
    evaluations). Bugs it catches (each injected, each failed): Euler instead of Heun (wide 0.958),
    the slope's sign (NaN)."""
    mean_error, tight, wide, cost = sample_gaussian(["--no-denoise", *argv])
    assert cost in (nfe, nfe - 1)
    assert mean_error < 0.03  # 5 standard errors of the wide directions (0.3 / sqrt(2000))
    assert abs(tight - 1) < spread and abs(wide - 1) < spread, (tight, wide)


def test_ncsn_predictor_corrector_draws_the_gaussian_with_its_spread():
    """experiments/ncsn_samplers.py's predictor-corrector sampler (its rows are in the sampler table
    of experiments/README.md) from an exact draw of p_sigma_1 on the exact score of N(0.5,
    diag(lambda)), lambda from 50 down to 1e-6 in 64 dimensions, at 232 levels (463 evaluations).
    Measured over 3 seeds: KL 0.0009-0.0011 nats a dimension, spread 1.038-1.044 (tight) and
    1.000-1.006 (wide). Bugs it catches: the corrector's noise sqrt(step) (spread 0.78), the
    predictor's noise its variance for its std (KL 0.11), the corrector's snr not squared (KL
    143)."""
    g = torch.Generator().manual_seed(0)
    score, exact, errors = ncsn_samplers.gaussian_problem(2000, g, torch.logspace(1.7, -6, 64))
    _, sigmas, *_ = ncsn_samplers.settings("pc", 50.0, 463)
    torch.manual_seed(0)
    x = ncsn_samplers.predictor_corrector(score, exact() + 50 * torch.randn(2000, 64, generator=g),
                                          sigmas, denoise=False)
    result = errors(x)
    assert len(sigmas) == 232 and result["kl_per_dim"] < 0.01, result
    assert abs(result["spread_tight"] - 1) < 0.1 and abs(result["spread_wide"] - 1) < 0.1, result


@pytest.mark.parametrize("preset", ["ncsnv2", "ncsn2019"])
def test_ncsn_preview_sampler_converges_at_its_budget(preset):
    """The per-epoch previews (their sampler at its budget, final denoising included) on the exact
    score of an image-shaped Gaussian, pixel std 0.1: within 10% of the truth's spread
    (measured 1.017 and 1.036). Bug it catches: the old preview, 100 levels of one Langevin step
    with an eps tuned for 232 levels of 5 steps, which ends 8.5x too wide (4x for the 2019
    setting)."""
    args = ncsn.preview_args(ncsn.parse_args(["--preset", preset, "--batch-size", "500"]))
    mu, var = torch.full((3, 32, 32), 0.5), torch.full((3, 32, 32), 0.01)
    torch.manual_seed(0)
    x, nfe = ncsn.draw_samples(gaussian_score(mu, var),
                               {"mean": mu, "cov": torch.diag(var.flatten())}, 500, args,
                               torch.device("cpu"), None)
    # after Tweedie, or not
    truth = 0.01 / (0.01 + 0.01**2) ** 0.5 if args.denoise else (0.01 + 0.01**2) ** 0.5
    assert (nfe <= 50 and abs(x.std(0).mean().item() / truth - 1) < 0.1
            and (x.mean(0) - mu).abs().max() < 0.03)


def test_ncsn_every_sampler_starts_from_the_right_draw_even_at_a_small_sigma_1():
    """The 2019 setting's sigma_1 = 1 against data with one wide direction (std 7.67: CIFAR-10's
    first principal direction). Every sampler starts from N(mean, C + sigma_1^2 I), and the ODE,
    which cannot correct its start, draws the wide direction right (measured 7.73 against 7.67). Bug
    it catches: a start that ignores the data's covariance (uniform noise + sigma_1 z, as before:
    spread 1.02 for the ODE, 6.3 for annealed Langevin)."""
    d, g = 64, torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    variances = torch.cat([torch.tensor([7.67**2]), torch.full((d - 1,), 0.1**2)])
    mu = torch.full((d,), 0.5)

    def score(x, sigma):
        return -(x - mu) @ (q @ torch.diag(1 / (variances + sigma[0] ** 2)) @ q.T)

    args = ncsn.preview_args(ncsn.parse_args(["--preset", "ncsn2019", "--batch-size", "2000"]))
    for stats, ok in (({"mean": mu, "cov": q @ torch.diag(variances) @ q.T}, True),
                      # a uniform start's mean and covariance
                      ({"mean": mu, "cov": torch.eye(d) / 12}, False)):
        torch.manual_seed(0)
        x, _ = ncsn.draw_samples(score, stats, 2000, args, torch.device("cpu"), None)
        wide = ((x - mu) @ q[:, 0]).std().item() / (7.67**2 + 0.01**2) ** 0.5
        assert (abs(wide - 1) < 0.05) == ok, wide


def test_ncsn_ncsnv2_sampler_settings_reach_the_spread_technique_4_predicts():
    """Annealed Langevin with NCSNv2's L = 232, T = 5, eps = 6.2e-6 on the exact score of a
    Gaussian: the tight directions end with the spread langevin_variance_ratio predicts for a chain
    whose excess variance carries over from level to level (std 1.062 x the truth; NCSNv2's own
    formula assumes every level starts in equilibrium and predicts 1.027), and langevin_eps gives a
    step that shrinks that bias. Bugs it catches (injected, failed): the noise sqrt(2 alpha) written
    sqrt(alpha) (spread 0.75), alpha not scaled by sigma_i^2 / sigma_L^2; and a mean not reached.
    NCSNv2's formula, as experiments/ncsn_techniques.py prints it in its table, is checked against
    the paper's own writing of it (Song & Ermon 2020, technique 4):
    (1 - eps / sigma_L^2)^(2T) (gamma^2 - 2 eps / (sigma_L^2 - sigma_L^2 (1 - eps / sigma_L^2)^2))
    + 2 eps / (sigma_L^2 - sigma_L^2 (1 - eps / sigma_L^2)^2)."""
    sigmas = ncsn.geometric_sigmas(50, 0.01, 232)
    gamma = (sigmas[0] / sigmas[1]).item()
    predicted = ncsn.langevin_variance_ratio(6.2e-6, 5, gamma, 0.01) ** 0.5
    for eps, steps in ((6.2e-6, 5), (6.2e-5, 5), (2e-5, 100)):
        a, s2 = 1 - eps / 0.01**2, 0.01**2
        c = 2 * eps / (s2 - s2 * a**2)
        paper = a ** (2 * steps) * (gamma**2 - c) + c
        assert ncsn_techniques.ncsnv2_variance_ratio(eps, steps, gamma, 0.01) == \
            pytest.approx(paper)
    assert ncsn_techniques.ncsnv2_variance_ratio(6.2e-6, 5, gamma, 0.01) ** 0.5 == \
        pytest.approx(1.027, abs=0.001)
    # the defaults: NCSNv2's sampler
    mean_error, tight, wide, nfe = sample_gaussian(["--no-denoise"])
    assert nfe == 1160 and ncsn.sampler_levels(ncsn.parse_args([]))[2] == 6.2e-6
    assert (mean_error < 0.03 and tight == pytest.approx(predicted, abs=0.01)
            and abs(tight - 1.027) > 0.02)
    better = ncsn.langevin_eps(sigmas, 5)
    _, tight_better, _, _ = sample_gaussian(["--no-denoise", "--step-eps", str(better)])
    assert tight_better == pytest.approx(
        ncsn.langevin_variance_ratio(better, 5, gamma, 0.01) ** 0.5, abs=0.01)
    assert tight_better - 1 < 0.75 * (tight - 1)


def test_ncsn_a_budget_picks_evenly_spaced_levels_and_an_explicit_step_eps_wins():
    """--nfe with annealed Langevin. Bugs it catches: rounded rungs with unequal gaps for a network
    that handles any sigma (ratios 1.077-1.117 at --nfe 500 before), eps computed from the first gap
    only, and a user's --step-eps silently replaced."""
    sigmas, steps, eps = ncsn.sampler_levels(ncsn.parse_args(["--nfe", "500"]))
    ratios = sigmas[:-1] / sigmas[1:]
    assert (steps == 5 and len(sigmas) == 99
            and torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-4))
    assert eps == ncsn.langevin_eps(sigmas, 5) and eps != 6.2e-6
    assert ncsn.sampler_levels(ncsn.parse_args(["--nfe", "500", "--step-eps", "3e-6"]))[2] == 3e-6
    # the paper's on the paper's ladder
    assert ncsn.sampler_levels(ncsn.parse_args([]))[2] == 6.2e-6
    # an 'embed' network: rungs of its ladder, gaps of 2 or 3
    ladder = ncsn.geometric_sigmas(1.0, 0.01, 10)
    sigmas, steps, eps = ncsn.sampler_levels(ncsn.parse_args(["--preset", "ncsn2019",
                                                              "--nfe", "500"]))
    rungs = [int(torch.isclose(ladder, s, rtol=1e-6).nonzero()) for s in sigmas]
    gaps = [b - a for a, b in zip(rungs, rungs[1:])]
    assert len(sigmas) == 5 and max(gaps) - min(gaps) == 1  # 9 rungs' gaps over 4 steps: 2, 2, 3, 2
    widest = (sigmas[:-1] / sigmas[1:]).max()
    assert widest > sigmas[0] / sigmas[1]  # eps follows the largest gap, not the first:
    assert eps == ncsn.langevin_eps(torch.stack([sigmas[-1] * widest, sigmas[-1]]), 100)
    # wider: smaller
    assert eps < ncsn.langevin_eps(torch.stack([sigmas[0], sigmas[1], sigmas[-1]]), 100)


def test_ncsn_every_sampler_costs_the_network_evaluations_it_reports():
    """nfe (eval.json's nfe_per_sample, the --nfe knob) counted by a wrapper around the network. Bug
    it catches (injected, failed): a cost formula that counts Heun's two evaluations per step as
    one."""
    for sampler in ("ald", "ode"):
        for argv in ([], ["--nfe", "40"], ["--nfe", "41", "--no-denoise"],
                     ["--preset", "ncsn2019"]):
            calls = []

            def counting(x, sigma, calls=calls):
                calls.append(1)
                return -(x - 0.5)

            args = ncsn.parse_args(["--sampler", sampler, "--batch-size", "2", *argv])
            _, nfe = ncsn.draw_samples(counting, {"mean": torch.zeros(3), "cov": torch.eye(3)}, 2,
                                       args, torch.device("cpu"), None)
            assert len(calls) == nfe, (sampler, argv)
            # as close to the budget as the sampler's unit (ald: T steps; ode: 2) allows
            if "--nfe" in argv:
                unit = args.steps_per_level if sampler == "ald" else 2
                assert int(argv[1]) - unit < nfe <= int(argv[1]), (sampler, argv, nfe)


def two_mode_inpainting(sigma_factor=1.0, steps_per_level=5, n=2000, seed=0):
    """Inpainting x = (x1, x2, x3, x4) ~ 1/2 N(+1, 0.3^2 I) + 1/2 N(-1, 0.3^2 I) given x1 = x2 = 0.4
    (which puts all the conditional's mass on the + mode), with annealed Langevin from sigma 5 to
    0.01; the observation is re-noised at sigma_factor x the level's sigma. Returns
    (the share of samples on the + side, the std of the observed pixels around the observation at
    each level as the network saw them)."""
    means, s = torch.tensor([[1.0] * 4, [-1.0] * 4]), 0.3
    seen = []

    def score(x, sigma):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            log_p = torch.logsumexp(
                -((x[:, None] - means) ** 2).sum(-1) / (2 * (s**2 + sigma[0] ** 2)), 1)
            seen.append((sigma[0].item(), (x[:, :2].detach() - 0.4).std().item()))
            return torch.autograd.grad(log_p.sum(), x)[0]

    y, mask = (torch.tensor([0.4, 0.4, 0.0, 0.0]).expand(n, 4),
               torch.tensor([True, True, False, False]).expand(n, 4))
    sigmas = ncsn.geometric_sigmas(5.0, 0.01, 100)
    observe = ncsn_inpaint.observe
    torch.manual_seed(seed)
    try:
        ncsn_inpaint.observe = lambda x, sigma, observed, m: observe(x, sigma_factor * sigma,
                                                                     observed, m)
        eps = ncsn.langevin_eps(sigmas, steps_per_level)
        x = ncsn_inpaint.inpainting_langevin(score, 5 * torch.randn(n, 4), sigmas, steps_per_level,
                                             eps, y, mask, denoise=False)
    finally:
        ncsn_inpaint.observe = observe
    assert torch.equal(x[:, :2], y[:, :2])  # the observation itself at the end
    return (x[:, 2:].sum(1) > 0).float().mean().item(), seen


def test_ncsn_inpainting_noises_the_observed_pixels_to_each_level():
    """Alg. 2: at level i the network sees the observed pixels as the observation plus fresh noise
    of std sigma_i, before every step. Bugs it catches: re-noising at 2 sigma, at sigma / 4, or not
    at all (the old test could not tell them apart: the fresh noise cancels in a Gaussian's
    mean)."""
    for factor, ok in ((1.0, True), (2.0, False), (0.25, False)):
        _, seen = two_mode_inpainting(factor, steps_per_level=1, n=1000)
        worst = max(abs(std / sigma - 1) for sigma, std in seen)
        # 1,000 x 2 values: std's error ~2%, ~4% at worst
        assert (worst < 0.12) == ok, (factor, worst)


def test_ncsn_inpainting_samples_the_mode_the_observation_implies():
    """The conditional puts all its mass on the + mode; the marginal splits 1/2, 1/2. Alg. 2 moves
    the samples there: 0.97 on the + side over four seeds (0.966-0.974), the replacement method's
    known shortfall from 1. Bug it catches: the observation imposed only at the end instead of
    before every step (0.49-0.51)."""
    shares = [two_mode_inpainting(seed=seed)[0] for seed in range(2)]
    assert min(shares) > 0.9, shares
    observe = ncsn_inpaint.observe
    ncsn_inpaint.observe = lambda x, sigma, observed, mask: x  # never conditioned while sampling
    try:
        blind = two_mode_inpainting()[0]
    finally:
        ncsn_inpaint.observe = observe
    assert abs(blind - 0.5) < 0.05


def test_ncsn_test_dsm_quarters_hold_the_levels_they_name():
    """test_dsm_q1 .. q4 (logged every epoch; technique 2's exercise reads them): the loss at the
    largest quarter of the levels down to the smallest. The score s = q / sigma in every pixel, q
    the quarter of sigma's level counted from 0, scores 1/2 ||q + z||^2: D/2 (1 + q^2) on average,
    1536, 3072, 7680, 15360 (measured: within 0.4%; the noise is test_metrics' own, fixed). Bug it
    catches: test images drawn at any level, whichever quarter they are counted in (every quarter
    then 6,570-7,480)."""
    sigmas = ncsn.geometric_sigmas(50.0, 0.01, 8)

    def score(x, sigma):
        quarter = (sigma[:, None] == sigmas).float().argmax(1) // 2  # levels 0-1: quarter 0, ...
        return (quarter / sigma)[:, None, None, None].expand_as(x)

    images = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8)
    args, cpu = argparse.Namespace(batch_size=100), torch.device("cpu")
    result = ncsn.test_metrics(score, images, sigmas, args, cpu, None)
    for q in range(4):  # 100 images a quarter: standard error under 0.3%
        assert result[f"test_dsm_q{q + 1}"] == pytest.approx(1536 * (1 + q**2), rel=0.02)


def test_ncsn_ema_update_is_a_plain_average_outside_autograd():
    net, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2).requires_grad_(False)
    old = [p.clone() for p in ema.parameters()]
    ncsn.update_ema(ema, net, 0.9, step=10**6)  # long after the warm-up: d = decay
    for e, o, p in zip(ema.parameters(), old, net.parameters()):
        # no graph kept
        assert torch.allclose(e, 0.9 * o + 0.1 * p) and e.is_leaf and e.grad_fn is None
    old = [p.clone() for p in ema.parameters()]
    ncsn.update_ema(ema, net, 0.999, step=0)  # the first step: d = 1 / 10
    assert all(torch.allclose(e, 0.1 * o + 0.9 * p)
               for e, o, p in zip(ema.parameters(), old, net.parameters()))
    ncsn.update_ema(ema, net, 0.0, step=10**6)
    # decay 0: a copy
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), net.parameters()))


def test_ncsn_geometric_sigmas_and_score_net_shapes():
    sigmas = ncsn.geometric_sigmas(50, 0.01, 232)
    assert sigmas[0].item() == pytest.approx(50) and sigmas[-1].item() == pytest.approx(0.01)
    ratios = sigmas[1:] / sigmas[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-4)
    default, *_ = ncsn.build(ncsn.parse_args([]), torch.device("cpu"))
    # the papers' size (NCSNv2: 29.7M)
    assert 20e6 < sum(p.numel() for p in default.parameters()) < 35e6
    x, sigma = torch.rand(3, 3, 32, 32), torch.tensor([0.01, 1.0, 50.0])
    for mode in ("divide", "unconditional", "embed"):
        net = ncsn.ScoreNet(8, (1, 2), 1, mode)
        assert net(x, sigma).shape == (3, 3, 32, 32)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_ncsn_unconditional_network_is_ncsnv2s_technique_3():
    """s(x, sigma) = f(x) / sigma with f never told sigma (NCSNv2's models/ncsnv2.py uses the level
    only to divide). Bug it catches: an embedding, or the sigma-scaled input, leaking into the
    'unconditional' network (what the old ablation labelled technique 3 was f(x, sigma) / sigma)."""
    torch.manual_seed(0)
    net = ncsn.ScoreNet(8, (1, 2), 1, "unconditional")
    torch.nn.init.normal_(net.out[-1].weight)  # (it starts at zero)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = net(x, torch.full((2,), 0.01)) * 0.01, net(x, torch.full((2,), 3.0)) * 3.0
    assert torch.allclose(a, b, atol=1e-6) and a.abs().max() > 0
    assert net.embed is None and not any(isinstance(m, torch.nn.Linear) for m in net.modules())
    divide = ncsn.ScoreNet(8, (1, 2), 1, "divide")
    torch.nn.init.normal_(divide.out[-1].weight)
    with torch.no_grad():
        assert not torch.allclose(divide(x, torch.full((2,), 0.01)) * 0.01,
                                  divide(x, torch.full((2,), 3.0)) * 3.0)


def test_ncsn_both_score_parameterisations_reach_the_exact_score_from_sigma_1_to_0_01():
    """Data at three flat-colour images x_k: the score of p_sigma is
    sum_k w_k(x) (x_k - x) / sigma^2, with w = softmax_k(-|x - x_k|^2 / 2 sigma^2); its size grows
    as 1/sigma. A small network trained briefly by DSM on sigma = 1, 0.1, 0.01 must reach it at both
    ends. Bug it catches: an 'embed' network whose last norm is not sigma-conditioned (relative
    error 0.97 at sigma = 0.01: its output stuck at one size)."""
    g = torch.Generator().manual_seed(0)
    points = torch.rand(3, 3, 1, 1, generator=g).expand(3, 3, 8, 8).contiguous()  # (K, 3, 8, 8)
    sigmas = ncsn.geometric_sigmas(1.0, 0.01, 3)

    def exact_score(x, sigma):
        # (B, K)
        w = torch.softmax(-(x[:, None] - points).pow(2).flatten(2).sum(2) / (2 * sigma**2), dim=1)
        return (torch.einsum("bk,kchw->bchw", w, points) - x) / sigma**2

    for mode in ("divide", "embed"):
        torch.manual_seed(0)
        net = ncsn.ScoreNet(8, (1,), 1, mode)
        optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(300):
            loss = ncsn.dsm_loss(net, points[torch.randint(3, (64,), generator=g)], sigmas).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for sigma in (1.0, 0.01):
            # x ~ p_sigma
            x = points[torch.arange(256) % 3] + sigma * torch.randn(256, 3, 8, 8, generator=g)
            with torch.no_grad():
                estimate, truth = net(x, torch.full((256,), sigma)), exact_score(x, sigma)
            relative_error = ((estimate - truth).pow(2).sum() / truth.pow(2).sum()).sqrt().item()
            # measured 0.16-0.26; old 'embed': 0.97
            assert relative_error < 0.4, (mode, sigma, relative_error)


def test_ncsn_divide_network_is_unchanged_and_embed_adds_only_the_conditional_norm():
    """Bug it catches: the conditional norm leaking into the default ('divide') path, which must
    keep its architecture and speed; 'embed' differs by one Linear (embedding -> scale and shift)
    and no affine."""
    divide, embed = ncsn.ScoreNet(8, (1, 2), 1, "divide"), ncsn.ScoreNet(8, (1, 2), 1, "embed")
    assert not any(isinstance(m, ncsn.SigmaGroupNorm) for m in divide.modules())
    assert isinstance(embed.out[0], ncsn.SigmaGroupNorm)
    extra = sum(p.numel() for p in embed.parameters()) - sum(p.numel() for p in divide.parameters())
    emb_dim, channels = 4 * 8, 8
    # the Linear, minus GroupNorm's own affine
    assert extra == (emb_dim + 1) * 2 * channels - 2 * channels
    x, sigma = torch.rand(2, 3, 32, 32), torch.tensor([0.01, 50.0])
    assert embed(x, sigma).shape == divide(x, sigma).shape == (2, 3, 32, 32)


def test_ncsn_head_reads_the_input_in_float32_under_bf16_autocast():
    """At sigma = 0.01 bf16's rounding of the input is a fifth of the noise. Bug it catches: the
    head's autocast guard removed (the head then sees and returns bfloat16)."""
    net, seen = ncsn.ScoreNet(8, (1, 2), 1), {}
    net.head.register_forward_hook(
        lambda module, inputs, output: seen.update(x=inputs[0], h=output))
    x = torch.rand(2, 3, 32, 32)
    net.down[0].conv1.register_forward_hook(lambda module, inputs, output: seen.update(next=output))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        net(x, torch.full((2,), 0.01))
    assert (seen["x"].dtype == seen["h"].dtype == torch.float32
            and seen["next"].dtype == torch.bfloat16)
    # the c_in scaling
    assert torch.allclose(seen["x"], (x - 0.5) / (0.01**2 + 0.25) ** 0.5, rtol=0, atol=1e-6)


def test_ncsn_sigma_conditioned_norm_keeps_its_scale_precise_and_finite_under_autocast():
    """The scale exp(a) must reach 1 / sigma_L = 100 and beyond, precisely. Bugs it catches: a
    computed in bf16 (a ~ 4.6 rounded by up to 0.016: the scale, and every score, off by up to
    1.6%), or in float16 (a T4's autocast), whose exp overflows to inf past a = 11.1 and turns the
    score into NaN."""
    norm = ncsn.SigmaGroupNorm(8, 4)
    h, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 4)
    torch.nn.init.normal_(norm.scale_shift.weight, std=0.3)
    torch.nn.init.constant_(norm.scale_shift.bias[:8], 4.6)  # log-scales near 4.6: scales near 100
    with torch.no_grad():
        exact = norm(h, emb)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = norm(h, emb)
    # float32: 1e-7; bf16 would be 1e-2
    assert ((rounded - exact).abs().max() / exact.abs().max()).item() < 1e-4
    torch.nn.init.constant_(norm.scale_shift.bias[:8], 12.0)  # log-scale 12: scale 1.6e5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = norm(h, torch.zeros(2, 4))
    assert torch.isfinite(out).all() and out.abs().max() > 1e5


# ------------------------------------------------------------------------------------------------
# ncsn.py: training and commands
# ------------------------------------------------------------------------------------------------

def test_ncsn_non_finite_steps_leave_the_weights_alone_and_too_many_stop_the_run(
        tiny_images, tmp_path, monkeypatch):
    dsm, calls = ncsn.dsm_loss, []

    def every_second_step_diverges(*args, **kwargs):
        calls.append(1)
        return dsm(*args, **kwargs) * (float("nan") if len(calls) % 2 == 0 else 1.0)

    # every step diverges
    monkeypatch.setattr(ncsn, "dsm_loss", lambda *a, **k: dsm(*a, **k) * float("nan"))
    argv = train_args("ncsn", tiny_images, tmp_path, "--epochs", 1, "--max-bad-steps", 100)
    run = ncsn.main([*argv, "--name", "a"])
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.manual_seed(1)  # the run's seed: the same initial weights
    initial = ncsn.build(ncsn.parse_args(TINY["ncsn"]), torch.device("cpu"))[0].state_dict()
    # four NaN steps changed nothing
    assert all(torch.equal(ckpt["net"][k], initial[k]) for k in initial)
    monkeypatch.setattr(ncsn, "dsm_loss", every_second_step_diverges)
    run = ncsn.main([*argv, "--name", "b", "--limit-test", "1"])
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    adam_steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    # of 4 steps, the 2 bad ones were skipped: no update, no moment or count change
    assert adam_steps == {2}
    monkeypatch.setattr(ncsn, "dsm_loss", lambda *a, **k: dsm(*a, **k) * float("nan"))
    with pytest.raises(common.UserError, match="training diverged.*last good checkpoint"):
        ncsn.main([*argv, "--name", "c", "--max-bad-steps", "2"])


def test_ncsn_toy_experiment_reproduces_the_paper_figure(tmp_path):
    out = run_script("experiments/ncsn_toy.py", "--run-dir", tmp_path)
    shares = json.loads(next(tmp_path.glob("ncsn-toy__*/toy.json")).read_text())
    assert "share of samples in the (5,5) mode" in out.stdout
    data, plain, annealed, learned = shares.values()
    assert abs(data - 0.8) < 0.05 and abs(annealed - 0.8) < 0.05 and abs(learned - 0.8) < 0.07
    assert abs(plain - 0.8) > 0.15
    assert next(tmp_path.glob("ncsn-toy__*/toy.png")).stat().st_size > 10_000


def test_ncsn_sample_inpaint_and_eval_with_each_sampler(tiny_images, tmp_path, capsys):
    run = ncsn.main(train_args("ncsn", tiny_images, tmp_path, "--epochs", 1))
    ncsn.main(["--sample", str(run), "--n", "10"])
    samples = np.load(run / "samples.npz")["samples"]
    assert samples.shape == (10, 32, 32, 3) and samples.dtype == np.uint8
    assert (run / "samples.png").exists() and (run / "trajectory.png").exists()
    # trajectory.png's claim: the same eight chains, level by level. Bugs it catches: rows drawn
    # from other starts or noise (the seed not reset before each level), levels out of order, a
    # last row that is not the last level denoised
    def trajectory(*flags):  # the rows trajectory.png shows, by label
        shown = {}
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(common, "save_rows", lambda rows, path, title=None: shown.update(rows))
            ncsn.main(["--sample", str(run), "--n", "8", *flags])
        return shown

    args = ncsn.parse_args(["--sample", str(run)])
    net, _ = ncsn.load_trained(run, args, torch.device("cpu"))
    sigmas = ncsn.sampler_levels(args)[0]
    names = [f"sigma={sigma:.3g}" for sigma in sigmas]
    shown = trajectory()
    labels = list(shown)
    assert len(labels) == 8 and labels[0] == names[0] and labels[-2:] == [names[-1], "final"]
    assert [names.index(label) for label in labels[:-1]] == sorted(names.index(label)
                                                                   for label in labels[:-1])
    with torch.no_grad():
        final = ncsn.finish(net, shown[labels[-2]], sigmas[-1], args.denoise)
    assert torch.allclose(final, shown["final"], atol=1e-5)
    # with --n 8, samples.npz holds the same eight chains as the final row
    assert np.array_equal(common.to_uint8(shown["final"]).permute(0, 2, 3, 1).numpy(),
                          np.load(run / "samples.npz")["samples"])
    # the ODE is deterministic: every row, carried on through the levels after its own, is the last
    shown = trajectory("--sampler", "ode")
    for label in labels[:-2]:
        with torch.no_grad():
            end = ncsn.probability_flow(net, shown[label], sigmas[names.index(label):], False)
        assert torch.allclose(end, shown[labels[-2]], atol=1e-4)
    ncsn_inpaint.inpaint([str(run)])  # NCSN Alg. 2: experiments/ncsn_inpaint.py
    assert (run / "inpaint_right_half.png").exists() and (run / "inpaint_centre.png").exists()
    ncsn.main(["--eval", str(run), "--n", "12", "--fid-extractor", "tiny-random"])
    result = json.loads((run / "eval.json").read_text())
    assert (result["n_samples"] == 12 and math.isfinite(result["fid"])
            and result["nfe_per_sample"] == 11)
    # near D/2: a zero score
    assert result["sampler"] == "ald" and 0 < result["test_dsm"] < 3 * 1536
    assert set(result) >= {"test_dsm_q1", "test_dsm_q4", "sampling_seconds_per_1000"}
    ncsn.main(["--eval", str(run), "--n", "12", "--fid-extractor", "tiny-random",
               "--sampler", "ode", "--nfe", "8"])
    result = json.loads((run / "eval.json").read_text())
    assert (result["sampler"] == "ode" and result["nfe_per_sample"] == 7
            and math.isfinite(result["fid"]))
    capsys.readouterr()
    ncsn.main(["--sample", str(run), "--n", "4", "--sampler", "ode", "--nfe", "9"])
    assert "9 network evaluations each" in capsys.readouterr().out
    with pytest.raises(ncsn.UserError, match="ode cannot inpaint"):
        ncsn_inpaint.inpaint([str(run), "--sampler", "ode"])
    with pytest.raises(SystemExit):
        ncsn.main(["--sample", str(run), "--sampler", "ode", "--nfe", "1"])
    assert "--nfe 1: --sampler ode needs two levels at least: --nfe 3 or more" in \
        capsys.readouterr().err
    # an 'embed' network is not asked about sigmas between its 10 levels
    with pytest.raises(SystemExit):
        ncsn.parse_args(["--preset", "ncsn2019", "--sampler", "ode", "--nfe", "58"])
    assert ("an 'embed' network knows its 10 levels only (it has not learned the others): --nfe 18 "
            "at most") in capsys.readouterr().err


@pytest.mark.skipif(not REAL_DATA.exists(),
                    reason="the shared CIFAR-10 JPEG copy is not on this machine")
def test_ncsn_learns_real_cifar10(tmp_path):
    args = ["--data", REAL_DATA, "--data-root", ROOT / "data", "--run-dir", tmp_path,
            "--limit-train", 2048, "--width", "16", "--channel-mult", "1,2,2",
            "--num-res-blocks", "1", "--num-scales", "10", "--steps-per-level", "1",
            "--batch-size", "32", "--limit-test", "200", "--lr", "1e-3", "--ema", "0",
            "--log-every", "16"]
    run_script("ncsn.py", *args, "--epochs", "1", timeout=600)  # 64 steps
    dsm = [r["test_dsm"] for r in common.read_metrics(only_run(tmp_path)) if "test_dsm" in r]
    assert len(dsm) == 2 and dsm[-1] < 0.8 * dsm[0]  # before training (1536), after (344)


# ------------------------------------------------------------------------------------------------
# vae.py: math with known answers
# ------------------------------------------------------------------------------------------------

def pinned_params(m, pinned, generator):
    """Random mixture parameters (1, 10m, 1, 1) whose channel `pinned` is certain to be -1 or +1."""
    params = torch.randn(1, 10 * m, 1, 1, generator=generator, dtype=torch.float64)
    means, log_scales, coeffs = (params[0, m + i * 3 * m:m + (i + 1) * 3 * m].view(3, m)
                                 for i in range(3))
    means *= 1.5  # some means beyond [-1, 1]: the open edge bins must catch their mass
    means[0, 0], log_scales[0, 0] = 1.3, -9.0  # past the top edge, smallest scale (clamped to e^-7)
    means[pinned] = 5.0 if pinned == 2 else -5.0
    log_scales[pinned] = -9.0
    coeffs[1:] = 0.0 if pinned == 2 else coeffs[1:]  # a pinned B ignores R and G
    return params


@pytest.mark.parametrize("pinned", [2, 0])
def test_vae_discretized_likelihood_sums_to_one_over_all_256_values_including_edges(pinned):
    """The joint P(R, G, B) with the R -> G -> B coupling sums to 1 over all 256 x 256 x 256 values.

    One channel is made certain (all its mass on value 0 or 255), so the sum over the other two
    channels' 256 x 256 values is the whole sum: pinned B checks R and G -> R; pinned R checks G and
    B -> R, G.
    """
    g = torch.Generator().manual_seed(pinned)
    m = 3
    params = pinned_params(m, pinned, g)
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 256 values on [-1, 1]
    first, second = torch.meshgrid(values, values, indexing="ij")  # (256, 256): one pixel per pair
    fixed = torch.full_like(first, 1.0 if pinned == 2 else -1.0)
    # (1, 3, 256, 256)
    x = torch.stack([first, second, fixed] if pinned == 2 else [fixed, first, second])[None]
    probs = vae.discretized_logistic_mixture_logp(x, params.expand(1, -1, 256, 256), m).exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert probs[0, -1].sum() > 0.01 and probs[0, 0].sum() > 1e-4  # the edge rows carry real mass


def test_vae_uniform_decoder_gives_exactly_8_bits_per_dim(monkeypatch):
    net = vae.VAE(width=8, blocks=1, latent_channels=4, mixtures=2)
    torch.nn.init.zeros_(net.encoder[-1].weight)  # q(z|x) = N(0, I) = p(z): KL exactly 0
    torch.nn.init.zeros_(net.encoder[-1].bias)
    uniform = lambda x, params, m: torch.full((len(x), 32, 32), -3 * math.log(256),  # noqa: E731
                                              dtype=torch.float64)
    monkeypatch.setattr(vae, "discretized_logistic_mixture_logp", uniform)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    args = vae.parse_args(["--batch-size", "4"])
    result = vae.test_metrics(net, images, args, torch.device("cpu"), None)
    assert result["test_bpd"] == pytest.approx(8.0, abs=1e-12)
    assert (result["test_distortion_bpd"] == pytest.approx(8.0, abs=1e-12)
            and result["test_rate_bpd"] == 0)
    assert result["active_units"] == 0  # every posterior mean is 0: no unit is active
    # the training step logs both terms in bits/dim too: the KL summed over an image's latents
    with torch.no_grad():
        net.encoder[-1].bias[:4].fill_(1.0)  # mu = 1: KL 1/2 on each of the 4 x 8 x 8 latents
    logs, _ = vae.train_step(net, net, torch.optim.Adam(net.parameters()),
                             vae.grad_scaler(torch.device("cpu"), None), images[:4].float() / 255,
                             1.0, args, vae_state(), None)
    assert logs["distortion_bpd"].item() == pytest.approx(8.0, abs=1e-12)
    assert logs["rate_bpd"].item() == pytest.approx(128 / (3072 * math.log(2)), rel=1e-9)


def test_vae_analytic_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu, logvar = (torch.randn(6, generator=g, dtype=torch.float64),
                  torch.randn(6, generator=g, dtype=torch.float64))
    z = mu + (0.5 * logvar).exp() * torch.randn(400_000, 6, generator=g, dtype=torch.float64)
    # E_q[log q - log p]
    monte_carlo = (vae.log_normal(z, mu, logvar) - vae.log_normal(z, 0 * z, 0 * z)).mean(0)
    assert torch.allclose(monte_carlo, vae.gaussian_kl(mu, logvar), atol=0.02, rtol=0.02)
    assert vae.gaussian_kl(torch.zeros(3), torch.zeros(3)).abs().max() == 0  # q = p


def test_vae_iwae_bound_k1_is_the_elbo_in_expectation_and_k8_is_at_least_the_elbo():
    torch.manual_seed(0)
    net = vae.VAE(width=8, blocks=1, latent_channels=4, mixtures=2).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8).float() / 127.5 - 1
    n = 128
    x = images.repeat_interleave(n, 0)  # (2n, 3, 32, 32): n draws per image
    with torch.no_grad():
        log_px_z, kl = net(x)
        elbo = (log_px_z - kl.sum(1)).view(2, n)  # analytic KL, one z per draw
        iwae_1 = vae.iwae_logp(net, x, 1).view(2, n)  # Monte Carlo KL, one z per draw
        # 8 z per draw, a quarter of the draws
        iwae_8 = vae.iwae_logp(net, x[::4], 8).view(2, n // 4)
    se = ((elbo.var(1) + iwae_1.var(1)) / n).sqrt()
    assert ((elbo.mean(1) - iwae_1.mean(1)).abs() < 4 * se).all()
    assert (iwae_8.mean(1) > elbo.mean(1)).all()  # a tighter bound on log p(x)


def test_vae_free_bits_stop_the_gradient_of_a_small_kl_only():
    # (B, C): channel 0 averages 1.0 nats
    kl = torch.tensor([[0.5, 5.0], [1.5, 7.0]], requires_grad=True)
    loss = vae.training_loss(torch.zeros(2), kl, beta=1.0, free_nats=2.0)
    loss.backward()
    assert loss.item() == pytest.approx((2.0 + 6.0) / 3072)  # max(2, 1) + max(2, 6)
    assert kl.grad[:, 0].abs().sum() == 0 and (kl.grad[:, 1] > 0).all()


def test_vae_iwae_bound_is_exactly_log_px_when_every_importance_weight_is_equal(monkeypatch):
    """Replaces the constant-checking role of
    test_vae_iwae_bound_k1_is_the_elbo_in_expectation_and_k8_is_..., which passes with a missing or
    wrong `- log K`. Here q(z|x) = p(z) and the decoder ignores z, so every weight p(x|z_k) p(z_k) /
    q(z_k|x) equals p(x) and L_K = log p(x) exactly for every K; p(x) is computed independently from
    the logistic CDF. Bug it catches: a missing `- math.log(k)` (off by log K), or a wrong constant
    such as log(chunk) (K = 30 spans two chunks of 25)."""
    m, g = 1, torch.Generator().manual_seed(0)
    net = vae.VAE(width=8, blocks=1, latent_channels=4, mixtures=m)
    # logits, 3 means, 3 log-scales, 3 coefficients
    params = torch.rand(1, 10, 32, 32, generator=g) * 2 - 1
    # log-scales in [-1, 0]: every bin's mass is far from underflow
    params[:, 4:7] = params[:, 4:7] / 2 - 0.5
    params[:, 7:] = 0.0  # no R -> G -> B coupling: three independent logistics per pixel
    monkeypatch.setattr(net, "encode", lambda x: (torch.zeros(len(x), 4, 8, 8),
                                                  torch.zeros(len(x), 4, 8, 8)))
    monkeypatch.setattr(net, "decode", lambda z: params.expand(len(z), -1, -1, -1))
    # edge values 0 and 255 included
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=g).float() / 127.5 - 1
    mean, inv_s = params[:, 1:4].double(), torch.exp(-params[:, 4:7].double())  # (1, 3, 32, 32)
    xd = x.double()
    upper = torch.where(xd > 0.999, 1.0, torch.sigmoid(inv_s * (xd + 1 / 255 - mean)))
    lower = torch.where(xd < -0.999, 0.0, torch.sigmoid(inv_s * (xd - 1 / 255 - mean)))
    log_px = (upper - lower).log().sum((1, 2, 3))  # (3,) exact, in float64
    for k in (1, 7, 30):
        torch.manual_seed(k)
        iwae = vae.iwae_logp(net, x, k)
        # log 7 = 1.95
        assert torch.allclose(iwae.double(), log_px, rtol=0, atol=0.05), (k, iwae - log_px)


def test_vae_decoder_samples_follow_the_discretized_likelihood():
    """Samples of p(x|z) (what FID now scores) have the frequencies Eq. (3) assigns. Bugs it
    catches: the logistic's inverse CDF with the wrong sign or scale, the component drawn from the
    wrong logits, the edge bins closed, the G-on-R coupling applied to the mean instead of the drawn
    R."""
    m, n = 3, 40_000
    g = torch.Generator().manual_seed(0)
    params = torch.randn(1, 10 * m, 1, 1, generator=g)
    means, log_scales, coeffs = (params[0, m + i * 3 * m:m + (i + 1) * 3 * m].view(3, m)
                                 for i in range(3))
    # R: mass in the bottom edge bin, the middle and near the top
    means[0] = torch.tensor([-0.95, 0.2, 0.9])
    log_scales[0] = torch.tensor([-2.5, -3.0, -4.0])
    # G and B certain (value 0) whatever R is: P(R, G, B) = P(R)
    means[1:], log_scales[1:] = -5.0, -9.0
    coeffs[:] = 0.3
    torch.manual_seed(1)
    x = vae.sample_mixture(params.expand(n, -1, 1, 1), m)  # (n, 3, 1, 1)
    # on the 256 values
    assert (x[:, 1:] == -1).all() and torch.equal(x, ((x + 1) * 127.5).round() / 127.5 - 1)
    counts = torch.bincount(((x[:, 0, 0, 0] + 1) * 127.5).round().long(), minlength=256).double()
    values = torch.arange(256.0) / 127.5 - 1
    grid = torch.stack([values, -torch.ones(256), -torch.ones(256)]).view(1, 3, 1, 256)
    p = vae.discretized_logistic_mixture_logp(
        grid, params.expand(1, -1, 1, 256), m).exp().double().view(256)
    # the open bottom bin is well used
    assert p.sum() == pytest.approx(1.0, abs=1e-4) and counts[0] > 1000
    z = (counts / n - p) / (p * (1 - p) / n).sqrt().clamp(min=1e-3)
    assert z.abs().max() < 5, z.abs().max()
    # coupling: a near-certain G sits at mean_G + alpha R, with R the value drawn (one component)
    params = torch.tensor(
        [0.0, 0.0, 0.1, -5.0, -1.0, -9.0, -9.0, math.atanh(0.5), 0.0, 0.0]).view(1, 10, 1, 1)
    # logit; means R, G, B; log-scales (R wide, G and B certain); alpha = tanh(atanh 0.5):
    # G = 0.1 + 0.5 R
    x = vae.sample_mixture(params.expand(2000, -1, 1, 1), 1)
    # a bin, and s = e^-7
    assert x[:, 0].std() > 0.3 and (x[:, 1] - (0.1 + 0.5 * x[:, 0])).abs().max() < 0.02


def test_vae_means_are_the_average_of_the_decoders_samples():
    """E[x|z] (the previews' and --sample's means, and the FID of the means) against the average of
    40,000 draws of p(x|z) for one pixel whose components lie inside [-1, 1] (no mass in the open
    edge bins). Bugs it catches: G's mean without its coupling to R, the components averaged
    without their weights."""
    m, n = 3, 40_000
    g = torch.Generator().manual_seed(0)
    params = torch.randn(1, 10 * m, 1, 1, generator=g)
    means, log_scales, coeffs = (params[0, m + i * 3 * m:m + (i + 1) * 3 * m].view(3, m)
                                 for i in range(3))
    means *= 0.3
    log_scales[:] = -4.0
    torch.manual_seed(1)
    drawn = vae.sample_mixture(params.expand(n, -1, 1, 1), m).mean(0).flatten()
    exact = vae.mixture_mean(params, m).flatten()
    # measured over 8 seeds: 0.0017 at worst; with the bugs 0.02-0.15 and 0.06-0.33
    assert (exact - drawn).abs().max() < 0.01


def test_vae_kl_weight_zero_leaves_no_kl_gradient_and_warm_up_scales_to_the_kl_weight():
    """beta = --kl-weight x warm-up ramp; beta = 0 drops the KL from the loss, and the step's
    gradient is the reconstruction term's alone. Bugs it catches: a warm-up that ramps to 1 whatever
    --kl-weight says, free bits adding a KL term at beta = 0, and 0 * KL turning into NaN once an
    unpenalised KL overflows."""
    args = vae.parse_args(aasae.AASAE)
    assert (args.kl_weight, args.kl_warmup, args.free_bits) == (0.0, 0.0, 0.0)
    assert all(vae.schedule(step, 10, args)[1] == 0 for step in range(50))
    args = vae.parse_args([*aasae.AASAE, "--kl-warmup", "2", "--free-bits", "0.5"])
    # even with warm-up and free bits
    assert all(vae.schedule(step, 10, args)[1] == 0 for step in range(50))
    for weight in (1.0, 0.25):
        args = vae.parse_args(["--kl-weight", str(weight), "--kl-warmup", "2",
                               "--warmup-steps", "100"])
        assert (vae.schedule(9, 10, args)[1] == pytest.approx(weight / 2)
                and vae.schedule(19, 10, args)[1] == weight)
        assert (vae.schedule(500, 10, args) == (args.lr, weight)
                and vae.schedule(49, 10, args)[0] == args.lr / 2)
    kl = torch.tensor([[0.5, float("inf")], [1.5, 7.0]], requires_grad=True)  # an overflowed KL
    log_px_z = torch.tensor([-3000.0, -2000.0], requires_grad=True)
    loss = vae.training_loss(log_px_z, kl, beta=0.0, free_nats=2.0)
    loss.backward()
    assert loss.item() == pytest.approx(2500 / 3072) and (kl.grad is None or not kl.grad.any())
    # one real training step at beta = 0: its gradient is that of the reconstruction term alone
    args = vae.parse_args(["--width", "8", "--blocks", "1", "--latent-channels", "4",
                           "--mixtures", "2", *aasae.AASAE, "--free-bits", "0.5"])
    torch.manual_seed(0)
    net, _, optimizer, scaler = vae.build(args, torch.device("cpu"))
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(1)
    vae.train_step(net, net, optimizer, scaler, x, 0.0, args, vae_state(), None, aasae.simclr_view)
    ours = [p.grad.clone() for p in net.parameters()]
    torch.manual_seed(0)
    net, *_ = vae.build(args, torch.device("cpu"))
    torch.manual_seed(1)  # the same view and the same eps
    view = aasae.simclr_view(x) * 2 - 1
    log_px_z, _ = net(x * 2 - 1, view)
    (-log_px_z.mean() / 3072).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
    assert all(torch.allclose(a, p.grad, rtol=1e-5, atol=1e-8)
               for a, p in zip(ours, net.parameters()))


def vae_state():
    return {"grad_norm_avg": torch.tensor(math.inf), "clipped_outliers": torch.tensor(0)}


def logistic_logp(x, mean, log_scale):
    """log P(x) of one discretized logistic (float64), edge bins open: from the CDF directly."""
    inv_s = torch.exp(-log_scale)
    upper = torch.where(x > 0.999, 1.0, torch.sigmoid(inv_s * (x + 1 / 255 - mean)))
    lower = torch.where(x < -0.999, 0.0, torch.sigmoid(inv_s * (x - 1 / 255 - mean)))
    return (upper - lower).log()


def test_vae_rgb_coupling_moves_g_with_the_true_r_and_b_with_r_and_g():
    """One component: P(R, G, B) = P(R; m_R) P(G; m_G + alpha R) P(B; m_B + beta R + gamma G), with
    R and G the pixel's true values, against that product written out from the logistic CDF.
    Bugs it catches: G's mean moved by R's mean instead of the true R, B's coefficients of R and G
    swapped (every such coupling still sums to 1, so the sum-to-one test cannot see them)."""
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 256, (3, 64), generator=g).double() / 127.5 - 1
    values[:, :2] = torch.tensor([[-1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]])  # edge values too
    means = torch.rand(3, 64, generator=g, dtype=torch.float64) * 1.6 - 0.8
    # scales e^-1.5 to e^-0.5: every bin's mass is well inside float64's precision
    log_scales = torch.rand(3, 64, generator=g, dtype=torch.float64) - 1.5
    coeffs = torch.rand(3, 64, generator=g, dtype=torch.float64) * 1.6 - 0.8  # in (-0.8, 0.8)
    params = torch.cat([torch.zeros(1, 64, dtype=torch.float64), means, log_scales,
                        coeffs.atanh()]).view(1, 10, 1, 64)  # the logit, then (3, 1) each
    r, gr, b = values
    truth = (logistic_logp(r, means[0], log_scales[0])
             + logistic_logp(gr, means[1] + coeffs[0] * r, log_scales[1])
             + logistic_logp(b, means[2] + coeffs[1] * r + coeffs[2] * gr, log_scales[2]))
    ours = vae.discretized_logistic_mixture_logp(values.view(1, 3, 1, 64), params, 1).view(64)
    assert torch.allclose(ours, truth, rtol=0, atol=1e-6)


def test_vae_reparameterised_latents_have_the_posteriors_mean_and_std(monkeypatch):
    """z = mu + sigma eps, sigma = exp(log sigma^2 / 2): with q(z|x) = N(2, 0.5^2) the z the
    decoder receives have mean 2 and std 0.5 (4096 draws: standard errors 0.008 and 0.006; worst
    errors over 20 seeds 0.014 and 0.013, against the bound 0.05). Bug it catches: z = mu +
    sigma^2 eps (std 0.25), which the ELBO-against-IWAE test cannot see at initialisation, where
    sigma is near 1."""
    net, seen = vae.VAE(width=8, blocks=1, latent_channels=4, mixtures=2), {}
    monkeypatch.setattr(net, "encode", lambda x: (torch.full((len(x), 4, 8, 8), 2.0),
                                                  torch.full((len(x), 4, 8, 8), math.log(0.25))))
    decode = net.decode

    def decoding(z):  # the decoder, recording what it receives
        seen["z"] = z
        return decode(z)

    monkeypatch.setattr(net, "decode", decoding)
    torch.manual_seed(0)
    with torch.no_grad():
        net(torch.rand(16, 3, 32, 32) * 2 - 1)
    assert abs(seen["z"].mean().item() - 2) < 0.05 and abs(seen["z"].std().item() - 0.5) < 0.05


def test_vae_free_bits_apply_to_the_batch_average_kl_of_a_channel():
    """Eq. (5): max(lambda, E_batch KL_j). A channel whose KL averages 3 nats over the batch, above
    lambda = 2, is penalised in full for every image, the image at 0.5 nats included. Bug it
    catches: the clamp applied per image before the average (the small image's gradient is then 0
    and the loss 3.75 / 3072, not 3 / 3072)."""
    kl = torch.tensor([[0.5], [5.5]], requires_grad=True)  # (B, C): one channel, mean 3
    loss = vae.training_loss(torch.zeros(2), kl, beta=1.0, free_nats=2.0)
    loss.backward()
    assert loss.item() == pytest.approx(3.0 / 3072)
    assert torch.allclose(kl.grad, torch.full((2, 1), 0.5 / 3072))


@pytest.mark.parametrize("latent_size", [8, 4])
def test_vae_free_bits_are_nats_per_latent_so_a_channel_map_gets_lambda_times_its_size(
        latent_size):
    """--free-bits is lambda per latent; a channel map of s x s latents is free below lambda s^2.
    With q(z|x) = p(z) the KL is 0, so the step's loss is the distortion plus C lambda s^2 nats.
    Bug it catches: lambda used per channel map (s^2 = 64 times too small: 0.05 nats for a whole
    8x8 map)."""
    args = vae.parse_args([*TINY["vae"], "--latent-size", str(latent_size), "--free-bits", "0.05",
                           "--device", "cpu"])
    torch.manual_seed(0)
    net, _, optimizer, scaler = vae.build(args, torch.device("cpu"))
    torch.nn.init.zeros_(net.encoder[-1].weight), torch.nn.init.zeros_(net.encoder[-1].bias)
    logs, _ = vae.train_step(net, net, optimizer, scaler, torch.rand(4, 3, 32, 32), 1.0, args,
                             vae_state(), None)
    distortion = logs["distortion_bpd"].item() * 3072 * math.log(2)  # nats per image
    free = logs["loss"].item() * 3072 - distortion
    assert logs["rate_bpd"].item() == 0
    assert free == pytest.approx(args.latent_channels * 0.05 * latent_size**2, abs=0.01)


# ------------------------------------------------------------------------------------------------
# vae.py: training and commands
# ------------------------------------------------------------------------------------------------

def test_vae_non_finite_updates_are_skipped_and_outlying_ones_clipped():
    """A NaN batch is skipped (no update at all); a gradient norm 100x its running average is
    clipped to --skip-factor (10) x the average, and the update taken. Bugs it catches: an outlier
    passed unclipped, the running average moved by a non-finite norm."""
    torch.manual_seed(0)
    args = vae.parse_args([*TINY["vae"], "--free-bits", "0", "--device", "cpu", "--grad-clip", "0"])
    net, _, optimizer, scaler = vae.build(args, torch.device("cpu"))
    x, state = torch.rand(4, 3, 32, 32), vae_state()
    step = lambda batch: vae.train_step(net, net, optimizer, scaler, batch, 1.0,  # noqa: E731
                                        args, state, None)
    before = [p.detach().clone() for p in net.parameters()]
    logs, bad = step(x.clone().fill_(float("nan")))
    assert (bad and all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
            and state["grad_norm_avg"].isinf())
    logs, bad = step(x)
    # the first finite step sets the average
    assert not bad and state["grad_norm_avg"] == logs["grad_norm"]
    state["grad_norm_avg"] = average = logs["grad_norm"] / 100  # the next one looks 100x too big
    logs, bad = step(x)
    clipped = torch.nn.utils.get_total_norm([p.grad for p in net.parameters()])  # what Adam took
    assert not bad and state["clipped_outliers"] == 1 and logs["grad_norm"] > 50 * average
    assert clipped.item() == pytest.approx(10 * average.item(), rel=1e-4)


@pytest.mark.parametrize("trained", ["vae"], indirect=True)
def test_vae_logs_bits_per_dim_and_writes_previews(trained):
    _, _, full, _, _ = trained
    # samples, means, reconstructions
    assert (full / "samples" / "epoch_0002.png").read_bytes()[:4] == b"\x89PNG"
    epochs = [r for r in common.read_metrics(full) if "test_bpd" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]  # epoch 0: the model at initialisation
    for r in epochs:
        assert r["test_bpd"] == pytest.approx(r["test_distortion_bpd"] + r["test_rate_bpd"])
        assert 0 < r["test_bpd"] < 12 and 0 <= r["active_units"] <= r["latent_dims"] == 4 * 8 * 8
    assert any("distortion_bpd" in r and "rate_bpd" in r and "grad_norm" in r
               for r in common.read_metrics(full))
    summary = json.loads((full / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["test_bpd"] == epochs[-1]["test_bpd"]


def test_vae_sample_interpolate_and_eval(tiny_images, tmp_path, capsys):
    run = vae.main(train_args("vae", tiny_images, tmp_path, "--epochs", 1))
    vae.main(["--sample", str(run), "--n", "16", "--temperature", "0.7"])
    saved = np.load(run / "samples.npz")
    assert (saved["samples"].shape == saved["means"].shape == (16, 32, 32, 3)
            and saved["samples"].dtype == np.uint8)
    assert (run / "samples.png").exists() and not np.array_equal(saved["samples"], saved["means"])
    run_script("experiments/vae_interpolate.py", run)
    assert (run / "interpolations.png").read_bytes()[:4] == b"\x89PNG"
    # bugs the picture would hide: a path that ends where it starts, ends that are not posterior
    # means of test images (an encoder given [0, 1] pixels instead of [-1, 1]), uneven steps, and
    # decoded samples instead of means. The path's codes are read as they are decoded.
    paths, decode = [], vae.decode_images
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vae, "decode_images", lambda net, z, drawn=True: paths.append(
            (z.float(), drawn)) or decode(net, z, drawn))
        vae_interpolate.interpolate([str(run)])
    args = vae.parse_args(["--sample", str(run)])
    net, _ = vae.load_trained(run, args, torch.device("cpu"))
    test = common.load_images(args.data, args.data_root, "test").float() / 255
    codes = net.encode(test * 2 - 1)[0].detach().flatten(1)  # (16, D): every test image's mean
    assert len(paths) == 6 and not any(drawn for _, drawn in paths)
    for z, _ in paths:
        z = z.flatten(1)  # (8, D): t = 0, 1/7, ..., 1
        ends = [(codes - end).abs().amax(1).argmin().item() for end in (z[0], z[-1])]
        assert ends[0] != ends[1] and torch.allclose(z[[0, -1]], codes[ends], atol=1e-5)
        t = torch.linspace(0, 1, 8)[:, None]
        assert torch.allclose(z, (1 - t) * z[0] + t * z[-1], atol=1e-5)
    vae.main(["--eval", str(run), "--n", "16", "--iw-samples", "4",
              "--fid-extractor", "tiny-random"])
    result = json.loads((run / "eval.json").read_text())
    assert result["n_samples"] == 16 and result["n_test"] == 16 and result["iw_samples"] == 4
    assert result["test_iwae_bpd"] <= result["test_bpd"] + 0.01 and math.isfinite(result["fid"])
    assert "IWAE" in capsys.readouterr().out


def test_vae_aasae_encoder_sees_the_view_and_the_likelihood_scores_the_original(monkeypatch):
    """Eq. (6): q(z|t(x)) and p(x|z). Bugs it catches: the encoder given x instead of the view
    (the step would silently train a plain autoencoder), the likelihood scored on the view."""
    args = vae.parse_args(["--width", "8", "--blocks", "1", "--latent-channels", "4",
                           "--mixtures", "2", *aasae.AASAE])
    net, _, optimizer, scaler = vae.build(args, torch.device("cpu"))
    seen = {}

    def spy(name, fn):  # fn, recording its first argument
        def recorded(x, *rest):
            seen[name] = x
            return fn(x, *rest)
        return recorded

    monkeypatch.setattr(net, "encode", spy("encoder", net.encode))
    monkeypatch.setattr(vae, "discretized_logistic_mixture_logp",
                        spy("scored", vae.discretized_logistic_mixture_logp))
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(0)
    vae.train_step(net, net, optimizer, scaler, x, 0.0, args, vae_state(), None, aasae.simclr_view)
    torch.manual_seed(0)
    assert (torch.equal(seen["encoder"], aasae.simclr_view(x) * 2 - 1)
            and torch.equal(seen["scored"], x * 2 - 1))


def test_aasae_views_keep_shape_range_and_device_and_match_torchvision(monkeypatch):
    """The batched views equal torchvision's per-image functions (the AASAE code applies those
    through PIL). Bugs it catches: contrast blended with each channel's own mean (torchvision uses
    the grayscale mean), the hue formula off by a sector, a crop box outside [-1, 1], a flip that
    does not mirror, and any tensor made on the CPU (the meta device runs every op without data and
    refuses a mix of devices), colour jitter applied never (or always), the crop's area fixed."""
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g)
    x[0] = x[0, :1]  # a grey image: no hue
    brightness, contrast, saturation = (0.4 + 1.2 * torch.rand(6, generator=g) for _ in range(3))
    hue = 0.5 * (2 * torch.rand(6, generator=g) - 1)
    ours = aasae.colour_jitter(x, brightness, contrast, saturation, hue)
    theirs = torch.stack([
        TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(
            x[i], brightness[i].item()), contrast[i].item()), saturation[i].item()), hue[i].item())
        for i in range(6)])
    assert torch.allclose(ours, theirs, atol=1e-5)
    one, zero = torch.ones(6), torch.zeros(6)
    # the whole image
    assert torch.allclose(aasae.resized_crop(x, one, one, zero, zero, one), x, atol=1e-6)
    assert torch.allclose(aasae.resized_crop(x, one, one, zero, zero, -one), x.flip(3), atol=1e-6)
    # the top-right quarter, 2x
    quarter = aasae.resized_crop(x, one / 2, one / 2, zero + 0.5, zero - 0.5, one)
    resized = F.interpolate(x[..., :16, 16:], size=32, mode="bilinear", align_corners=False)
    # (borders: see below)
    assert torch.allclose(quarter[..., 1:-1, 1:-1], resized[..., 1:-1, 1:-1], atol=1e-5)
    torch.manual_seed(0)
    views = aasae.simclr_view(x.repeat(50, 1, 1, 1))
    assert views.shape == (300, 3, 32, 32) and views.dtype == torch.float32
    assert views.min() >= 0 and views.max() <= 1 and not torch.equal(views, x.repeat(50, 1, 1, 1))
    gray = ((views[:, 0] == views[:, 1]).flatten(1).all(1)
            & (views[:, 1] == views[:, 2]).flatten(1).all(1))
    # p = 0.2 (image 0 of each copy is grey already)
    assert 0.1 < gray.view(50, 6)[:, 1:].float().mean() < 0.3
    meta = aasae.simclr_view(torch.empty(4, 3, 32, 32, device="meta"))
    assert meta.device.type == "meta" and meta.shape == (4, 3, 32, 32)
    # the crop boxes simclr_view draws: inside the image, RandomResizedCrop's area and aspect ratio
    boxes = []
    monkeypatch.setattr(aasae, "resized_crop", lambda x, *box: boxes.append(box) or x)
    x = torch.rand(4000, 3, 32, 32)
    views = aasae.simclr_view(x)
    width, height, centre_x, centre_y, flip = boxes[0]
    # colour jitter on 80% of the views, then grey on 20%: a view left as its crop (here the image)
    # 0.2 x 0.8 = 16% of the time (measured over 3 seeds: 0.154-0.164; no jitter: 0.8)
    assert abs((views == x).flatten(1).all(1).float().mean() - 0.16) < 0.03
    # the area U(0.08, 1), shrunk where a side would leave the image (measured: mean 0.527-0.539)
    assert 0.48 < (width * height).mean() < 0.58
    assert ((centre_x.abs() + width <= 1 + 1e-6) & (centre_y.abs() + height <= 1 + 1e-6)).all()
    assert (width * height >= 0.08 - 1e-6).all() and (width * height <= 1 + 1e-6).all()
    # boxes that needed no shrinking keep their drawn aspect ratio
    free = (width < 1) & (height < 1)
    assert (((width / height)[free] >= 3 / 4 - 1e-6).all()
            and ((width / height)[free] <= 4 / 3 + 1e-6).all())
    assert (centre_x.std() > 0.2 and centre_y.std() > 0.2
            and abs((flip == -1).float().mean() - 0.5) < 0.05)


def test_vae_probe_reads_the_posterior_means_of_images_scaled_as_in_training():
    """The probe's features are E_q[z|x] of the images as vae.py feeds them, in [-1, 1], batch by
    batch. Bugs it catches: pixels scaled to [0, 1], the log-variance read for the mean, a last
    partial batch dropped. An encoder whose posterior mean is its input makes the answer exact."""
    from experiments import vae_probe

    class Identity:  # E_q[z|x] = x, log-variance -100
        def encode(self, x):
            return x, torch.full_like(x, -100.0)

    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    means = vae_probe.posterior_means(Identity(), images, argparse.Namespace(batch_size=2),
                                      torch.device("cpu"), None)
    assert torch.allclose(means, (images.float() / 127.5 - 1).flatten(1))


def test_aasae_trains_resumes_evaluates_and_probes_without_claiming_bits_per_dim(
        tiny_images, tmp_path, capsys):  # noqa: F811
    """experiments/aasae.py end to end: exact resume with the random views (and vae.py refusing to
    resume it without them), no bits/dim anywhere (train log, test rows, summary, eval) but a stated
    reason, the probe's three rows, and a clear error without labels."""
    # beta 0.5, not AASAE's 0: a resume must keep the run's own flags, not the script's defaults
    full = aasae.main(train_args("vae", tiny_images, tmp_path / "a", "--epochs", 2,
                                 "--kl-weight", 0.5))
    half = aasae.main(train_args("vae", tiny_images, tmp_path / "b", "--epochs", 1,
                                 "--kl-weight", 0.5))
    with pytest.raises(common.UserError, match="an AASAE run: resume it with experiments/aasae"):
        vae.main(["--resume", str(half), "--epochs", "2"])
    aasae.main(["--resume", str(half), "--epochs", "2"])
    assert full.name.startswith("vae__aasae__1__")  # named as what it is
    assert checkpoints_equal(*(torch.load(r / "checkpoint.pt", weights_only=True)
                               for r in (full, half)))
    rows = common.read_metrics(full)
    assert (any("distortion_bpd" in r for r in rows)
            and any("test_distortion_bpd" in r for r in rows))
    assert not any("test_bpd" in r for r in rows)
    summary = json.loads((full / "summary.json").read_text())
    assert "test_bpd" not in summary and "test_rate_bpd" in summary
    assert "no bits/dim" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        aasae.main(["--help"])
    assert capsys.readouterr().out.startswith("AASAE (Falcon et al. 2021")
    vae.main(["--eval", str(full), "--n", "16", "--iw-samples", "2",
              "--fid-extractor", "tiny-random"])
    result = json.loads((full / "eval.json").read_text())
    assert ("test_bpd" not in result and "test_iwae_bpd" not in result
            and "kl-weight 0.5" in result["bits_per_dim"])
    # samples of p(x|z), and means
    assert math.isfinite(result["fid"]) and math.isfinite(result["means_fid"])
    out = run_script("experiments/vae_probe.py", full)
    saved = json.loads((full / "probe.json").read_text())
    assert saved["n_train"] == 64 and saved["n_test"] == 16 and "l2" in out.stdout
    assert saved["classes"] == ["blobs_a", "blobs_b"] and saved["chance"] == 0.5
    for name in ("trained_encoder", "random_encoder", "raw_pixels"):
        assert (0 <= saved[name]["top1"] <= 1 and saved[name]["grad_max"] <= 1e-5
                and saved[name]["l2"] > 0)
    flat = tmp_path / "flat"
    write_images(flat, 40)
    proc = run_script("experiments/vae_probe.py", full, "--data", flat,
                      "--data-root", tmp_path / "data", check=False)
    assert (proc.returncode == 1 and "the probe needs labels" in proc.stderr
            and "Traceback" not in proc.stderr)


@pytest.mark.skipif(not REAL_DATA.exists(),
                    reason="the shared CIFAR-10 JPEG copy is not on this machine")
def test_vae_real_cifar10_copy_bits_per_dim_fall_below_init_and_8(tmp_path):
    run_script("vae.py", "--data", REAL_DATA, "--data-root", ROOT / "data", "--run-dir", tmp_path,
               *TINY["vae"], "--limit-train", 1024, "--limit-test", 256, "--batch-size", 32,
               "--epochs", 1, "--lr", 2e-3, "--warmup-steps", 5, "--kl-warmup", 0)
    at_init, final = (r["test_bpd"] for r in common.read_metrics(only_run(tmp_path))
                      if "test_bpd" in r)
    assert final < at_init and final < 8


def test_vae_an_outlier_enters_the_running_average_capped_at_the_bound():
    """The rule's running average of gradient norms takes an outlier as the bound (skip factor x
    the average), so one spike cannot double it: 0.99 a + 0.01 (10 a) = 1.09 a after a norm 100 a.
    Bug it catches: the outlier entered uncapped (1.99 a: each spike then loosens the bound that
    should have caught the next)."""
    torch.manual_seed(0)
    args = vae.parse_args([*TINY["vae"], "--free-bits", "0", "--device", "cpu", "--grad-clip", "0"])
    net, _, optimizer, scaler = vae.build(args, torch.device("cpu"))
    x, state = torch.rand(4, 3, 32, 32), vae_state()
    logs, _ = vae.train_step(net, net, optimizer, scaler, x, 1.0, args, state, None)
    state["grad_norm_avg"] = average = logs["grad_norm"] / 100  # the next one looks 100x too big
    logs, _ = vae.train_step(net, net, optimizer, scaler, x, 1.0, args, state, None)
    assert logs["grad_norm"] > 50 * average
    assert state["grad_norm_avg"].item() == pytest.approx(1.09 * average.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# ebm.py: math with known answers
# ------------------------------------------------------------------------------------------------

def test_ebm_sgld_in_langevin_proportion_samples_the_gaussian_of_a_quadratic_energy():
    torch.manual_seed(0)
    mu, s = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5

    def energy(x):  # E(x) = ||x - mu||^2 / (2 s^2): exp(-E) is N(mu, s^2 I)
        return ((x - mu) ** 2).sum(1) / (2 * s**2)

    # small against s^2: the discretisation inflates the variance by only 1 / (1 - eps / 4s^2)
    eps = 0.02 * s**2
    x0 = 3 * torch.randn(10000, 2, dtype=torch.float64)
    x, _ = ebm.sgld(energy, x0, 1000, eps / 2, math.sqrt(eps), grad_clip=None, bounds=None)
    assert torch.allclose(x.mean(0), mu, atol=0.02)
    assert torch.allclose(x.var(0), torch.full((2,), s**2, dtype=torch.float64), rtol=0.05)


def test_ebm_sgld_input_gradient_stays_accurate_under_float16():
    """SGLD's moves come from grad_x E, whose entries are tiny at initialisation (median 1e-6),
    below float16's smallest normal number (6e-5). Bug it catches: the energy differentiated without
    a fixed scale (under float16 autocast: 5.1% off against float32, 2.4% of the entries exactly 0;
    scaled by 1024: 0.09%). Float16 autocast runs on the CPU too."""
    torch.manual_seed(0)
    net = ebm.EnergyNet(128).eval()
    x = torch.rand(4, 3, 32, 32)
    exact = ebm.energy_gradient(lambda v: net(v).float(), x)
    with torch.autocast("cpu", dtype=torch.float16):
        half = ebm.energy_gradient(lambda v: net(v).float(), x)
    assert exact.abs().median() < 6e-6  # a tenth of float16's smallest normal number
    relative = ((half - exact).norm() / exact.norm()).item()
    assert relative < 0.01 and (half == 0).float().mean() < 0.001, relative


def test_ebm_replay_buffer_size_restarts_range_and_distinct_slots():
    torch.manual_seed(0)
    buffer = ebm.ReplayBuffer(500, (3, 32, 32), "cpu", restart_rate=0.05)
    assert (buffer.samples.shape == (500, 3, 32, 32) and 0 <= buffer.samples.min()
            and buffer.samples.max() <= 1)
    buffer.samples.fill_(0.5)  # a marker: anything else in a sampled row is a restart from U(0, 1)
    restarted = 0
    for _ in range(20):
        x, idx = buffer.sample(250)
        assert x.shape == (250, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
        # distinct: writing them back is deterministic on a GPU too
        assert len(set(idx.tolist())) == 250
        restarted += int((x != 0.5).flatten(1).any(1).sum())
        buffer.push(x.clamp(0, 1) * 0 + 0.5, idx)
    n = 20 * 250  # binomial(5000, 0.05): +-5 std around 0.05
    assert abs(restarted / n - 0.05) < 5 * math.sqrt(0.05 * 0.95 / n)
    assert len(buffer.samples) == 500


def test_ebm_a_gradient_step_on_the_loss_lowers_data_energy_relative_to_negatives():
    torch.manual_seed(0)
    net = ebm.EnergyNet(width=8)
    x_pos, x_neg = torch.rand(16, 3, 32, 32) * 0.2 + 0.4, torch.rand(16, 3, 32, 32)

    def gap():  # E(x+) - E(x-): the loss wants it low
        with torch.no_grad():
            net.eval()
            return (net(x_pos).mean() - net(x_neg).mean()).item()

    before = gap()
    net.train()
    loss = ebm.contrastive_divergence_loss(net(x_pos), net(x_neg), alpha=0.0)
    loss.backward()
    torch.optim.SGD(net.parameters(), lr=0.05).step()
    assert gap() < before
    # and the penalty pulls energies towards zero: its gradient on E is 2 alpha E
    e = torch.tensor([3.0, -2.0], requires_grad=True)
    ebm.contrastive_divergence_loss(e[:1], e[1:], alpha=1.0).backward()
    assert e.grad.tolist() == [1 + 2 * 3.0, -1 + 2 * -2.0]


def test_ebm_gradient_clip_is_igebms_per_entry_bound():
    """IGEBM clips each gradient entry to +-(3 sqrt(v_hat) + 0.1), v_hat Adam's second moment
    corrected for the step being taken (its custom_adam.py): 0.1 at the first step; an optimiser
    that is not an Adam is left alone. Bugs it catches: a global-norm clip instead (what ebm.py
    had: 0.1 on the whole gradient's norm), the bias correction left out or taken one step late,
    every SGD gradient clipped to +-0.1 (SGD never has Adam's state)."""
    w = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.Adam([w], lr=1e-3, betas=(0.0, 0.999))
    w.grad = torch.tensor([5.0, -5.0, 0.05, -0.05])
    ebm.clip_like_igebm(optimizer)
    # v = 0 at the first step: +-0.1
    assert w.grad.tolist() == pytest.approx([0.1, -0.1, 0.05, -0.05])
    optimizer.step()  # v_1 = (1 - 0.999) g^2
    w.grad = torch.tensor([5.0, -5.0, 0.05, -0.05])
    ebm.clip_like_igebm(optimizer)
    v = optimizer.state[w]["exp_avg_sq"]
    bound = 3 * (v / (1 - 0.999**2)).sqrt() + 0.1
    assert torch.allclose(
        w.grad, torch.maximum(torch.minimum(torch.tensor([5.0, -5.0, 0.05, -0.05]), bound), -bound))
    assert abs(w.grad[0].item()
               - (3 * 0.1 / math.sqrt(1 - 0.999**2) * math.sqrt(0.001) + 0.1)) < 1e-5
    sgd = torch.optim.SGD([w], lr=1e-3)
    w.grad = torch.tensor([5.0, -5.0, 0.05, -0.05])
    ebm.clip_like_igebm(sgd)
    assert torch.equal(w.grad, torch.tensor([5.0, -5.0, 0.05, -0.05]))


def test_ebm_toy_energy_is_lower_at_the_modes_than_between_them():
    net, buffer = ebm_toy.train_toy("8gaussians", iterations=1000, seed=0)
    angle = torch.arange(8) * math.pi / 4
    # the 8 centres, on the circle of radius 2
    modes = 2 * torch.stack([angle.cos(), angle.sin()], 1)
    # between k and k + 1
    between = 2 * torch.stack([(angle + math.pi / 8).cos(), (angle + math.pi / 8).sin()], 1)
    with torch.no_grad():
        e_modes, e_between, e_centre = net(modes), net(between), net(torch.zeros(1, 2))
    # every mode is a local minimum along the circle (CD learns shapes; the modes' relative masses
    # it learns poorly, because persistent chains seldom cross between modes), and the centre of the
    # ring is high
    assert (e_modes < e_between).all() and (e_modes < e_between.roll(1)).all()
    assert (e_modes < e_centre).all()
    assert buffer.samples.abs().max() <= ebm_toy.TOY["box"]


def test_ebm_sgld_clips_each_gradient_entry_and_clamps_to_the_image_range():
    """IGEBM's step x <- clamp(x - lambda clip(grad_x E, +-0.01) + noise, 0, 1) on an energy whose
    gradient is 100 everywhere, without noise: one step moves every pixel by exactly lambda x 0.01
    = 0.1; ten steps end at 0, not below. Bugs it catches: the clip dropped (a step of 1000), the
    clamp to [0, 1] dropped (the chain leaves the image range, -0.5 after ten steps)."""
    energy = lambda x: 100 * x.flatten(1).sum(1)  # noqa: E731
    x0 = torch.full((2, 3, 4, 4), 0.5)
    one, _ = ebm.sgld(energy, x0, 1, 10.0, 0.0, grad_clip=0.01)
    assert torch.allclose(one, torch.full_like(x0, 0.4))
    ten, _ = ebm.sgld(energy, x0, 10, 10.0, 0.0, grad_clip=0.01)
    assert torch.equal(ten, torch.zeros_like(x0))
    # inpainting's mask (1: free): the observed pixels stay exactly as given, noise and all; the
    # free ones move. Bugs it catches: the mask ignored, or applied the wrong way round
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1
    masked, _ = ebm.sgld(energy, x0, 1, 10.0, 0.05, grad_clip=0.01, mask=mask)
    assert torch.equal(masked * (1 - mask), x0 * (1 - mask))
    assert ((masked - x0) * mask).abs().amin((0, 1))[1:3, 1:3].gt(0).all()


def test_ebm_samples_start_from_the_whole_saved_buffer_or_from_uniform_noise():
    """--chains buffer (IGEBM) starts every chain at a saved chain, each used as evenly as n allows;
    --chains noise at U(0, 1). Bugs it catches: --chains noise ignored, and every chain started at
    one saved chain. A flat energy and no noise leave each chain where it starts."""
    flat = lambda x: 0 * x.flatten(1).sum(1)  # noqa: E731
    saved = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(4, 1, 1, 1).expand(4, 3, 32, 32)
    args = argparse.Namespace(chains="buffer", steps=2, batch_size=4, sgld_step_size=10.0,
                              sgld_noise=0.0, sgld_grad_clip=0.01)
    torch.manual_seed(0)
    x = ebm.draw_samples(flat, {"buffer": saved}, 10, args, torch.device("cpu"), None)
    starts = x.flatten(1)[:, 0]  # each sample is one flat image
    assert torch.equal(x, starts.view(10, 1, 1, 1).expand(10, 3, 32, 32))
    counts = sorted(int((starts == v).sum()) for v in saved[:, 0, 0, 0])
    assert counts == [2, 2, 3, 3]  # 10 chains from 4 saved ones
    args.chains = "noise"
    x = ebm.draw_samples(flat, {"buffer": saved}, 10, args, torch.device("cpu"), None)
    assert abs(x.mean().item() - 0.5) < 0.01 and abs(x.std().item() - 12**-0.5) < 0.01


def test_ebm_sgld_negatives_are_constants_even_when_the_energy_is_being_trained():
    """Contrastive divergence treats the negatives as constants: sgld returns them without a graph,
    even for an energy whose weights require gradients (the 2-D toy trains so). Bug it catches:
    grad_x E taken with create_graph=True, whose graph the chain then carries (ebm.py's own update
    is shielded by net.requires_grad_(False); the toy's loss would backpropagate through its 10
    SGLD steps into the weights)."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1),
                              torch.nn.Flatten(0))
    x, _ = ebm.sgld(net, torch.randn(8, 2), 5, 0.01, 0.1, bounds=None)
    assert not x.requires_grad and x.grad_fn is None


def test_ebm_replay_buffer_restarts_at_the_rate_it_is_given():
    """restart_rate 1 restarts every chain from U(low, high) (the short-run chains of Nijkamp et
    al., experiments/ebm_chains.py), 0 none, and 0.3 about 30% (+-5 standard errors; at most 2.0
    over 20 seeds). Bug it
    catches: the rate ignored (a fixed 5%, which the default-rate test cannot tell apart)."""
    torch.manual_seed(0)
    for rate, low, high in ((1.0, -2.0, 2.0), (0.0, 0.0, 1.0), (0.3, 0.0, 1.0)):
        buffer = ebm.ReplayBuffer(1000, (2,), "cpu", restart_rate=rate, low=low, high=high)
        buffer.samples.fill_(5.0)  # a marker outside the noise's range
        x, _ = buffer.sample(1000)
        fresh = (x != 5.0).all(1).float()
        assert abs(fresh.mean().item() - rate) < 5 * math.sqrt(rate * (1 - rate) / 1000) + 1e-9
        assert (x[fresh == 1] >= low).all() and (x[fresh == 1] <= high).all()


# ------------------------------------------------------------------------------------------------
# ebm.py: training and commands
# ------------------------------------------------------------------------------------------------

def inject_divergence_at(monkeypatch, at, length):
    """Make training steps at, at + 1, ... report non-finite energies, as a real divergence
    would."""
    train_step, calls = ebm.train_step, []

    def diverging_train_step(*args, **kwargs):
        calls.append(1)
        logs, bad = train_step(*args, **kwargs)
        if at <= len(calls) < at + length:
            return {k: v * float("nan") for k, v in logs.items()}, torch.ones_like(bad)
        return logs, bad

    monkeypatch.setattr(ebm, "train_step", diverging_train_step)


def test_ebm_divergence_rolls_back_to_the_last_good_checkpoint_with_a_lower_lr(
        tiny_images, tmp_path, capsys, monkeypatch):
    inject_divergence_at(monkeypatch, 6, 2)  # steps 6 and 7 of 8: two bad steps in a row
    argv = train_args("ebm", tiny_images, tmp_path, "--epochs", 2, "--log-every", 1,
                      "--max-bad-steps", 2)
    run = ebm.main(argv)
    rows = common.read_metrics(run)
    rollback = [r for r in rows if "rollback" in r]
    lowered = pytest.approx(0.5 * ebm.parse_args([]).lr)
    assert len(rollback) == 1 and rollback[0]["lr"] == lowered and rollback[0]["step"] == 7
    assert "rolled back" in capsys.readouterr().err
    last = [r for r in rows if "lr" in r][-1]
    assert last["step"] == 8 and last["lr"] == lowered  # the run continued to the end
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["state"]["rollbacks"] == 1
    assert (all(torch.isfinite(v).all() for v in ckpt["net"].values())
            and torch.isfinite(ckpt["state"]["buffer"]).all())
    assert json.loads((run / "summary.json").read_text())["rollbacks"] == 1
    # (wraps the wrapper above, which has no injection left)
    inject_divergence_at(monkeypatch, 2, 100)
    with pytest.raises(common.UserError, match="diverged.*last good checkpoint"):
        ebm.main([*argv, "--name", "again", "--max-rollbacks", "0"])


NAN_CHAINS_ON_RANK_1 = """
sample, calls = module.ReplayBuffer.sample, []

def nan_chains_on_rank_1(self, n):  # its first two batches: NaN energies on rank 1 alone
    x, idx = sample(self, n)
    calls.append(1)
    return (x * torch.nan if dist.get_rank() == 1 and len(calls) <= 2 else x), idx

module.ReplayBuffer.sample = nan_chains_on_rank_1
"""


def test_ebm_ranks_roll_back_together(tiny_images, tmp_path):
    """Under torchrun a divergence on one rank rolls every rank back. Bug it catches: each rank
    counting its own bad steps (no all_reduce): rank 1 alone restores its weights and lowers its
    lr, and the ranks train on apart (DDP never compares their weights again)."""
    (tmp_path / "agree.py").write_text(RANKS_AGREE.format(model="ebm", patch=NAN_CHAINS_ON_RANK_1))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(tmp_path / "agree.py"), str(ROOT),
                           *train_args("ebm", tiny_images, tmp_path, "--epochs", 1,
                                       "--max-bad-steps", 2)],
                          env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rollback 1 of 3" in proc.stderr and "ranks agree" in proc.stdout


def test_ebm_rollback_restores_float16s_loss_scale(tiny_images, tmp_path, monkeypatch):
    """A rollback restores the scaler with the weights. Bug it catches: a scaler left as the bad
    steps left it, halved at each (on a T4, 2^16 -> 2^-34 after 50 of them: every float16
    gradient then underflows to zero, and the rolled-back run silently stops learning)."""
    monkeypatch.setattr(ebm, "amp_dtype", lambda args, device: torch.float16)
    loss, calls = ebm.contrastive_divergence_loss, []

    def nan_at_steps_6_and_7(*args):
        calls.append(1)
        return loss(*args) * (math.nan if len(calls) in (6, 7) else 1.0)

    monkeypatch.setattr(ebm, "contrastive_divergence_loss", nan_at_steps_6_and_7)
    inject_divergence_at(monkeypatch, 6, 2)  # (and the steps report the divergence)
    run = ebm.main(train_args("ebm", tiny_images, tmp_path, "--epochs", 2, "--log-every", 1,
                              "--max-bad-steps", 2))
    assert [r["step"] for r in common.read_metrics(run) if "rollback" in r] == [7]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["precision"] == "torch.float16" and ckpt["scaler"]["scale"] == 2.0**16


def test_ebm_resumes_on_another_number_of_processes_whatever_the_buffer_size(tiny_images, tmp_path):
    """The replay buffer is shared out over the ranks at every resume. Bug it catches: unequal
    shares when the count does not divide the buffer (tensor_split: a run trained on 2 processes
    with --buffer-size 100, resumed on 3, died at the end of its first epoch in the collective that
    gathers the shares)."""
    argv = train_args("ebm", tiny_images, tmp_path, "--buffer-size", 100, "--batch-size", 6)
    run_script("ebm.py", *argv, "--epochs", 1, torchrun=True)
    run = only_run(tmp_path / "runs")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=3", str(ROOT / "ebm.py"), "--resume", str(run),
                           "--epochs", "2"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["state"]["buffer"].shape == (99, 3, 32, 32)  # 3 shares of 33
    buffer = ebm.ReplayBuffer(33, (3, 32, 32), "cpu")
    saved = torch.arange(100.0).view(100, 1, 1, 1).expand(100, 3, 32, 32)
    shares = []
    for rank in range(3):
        ebm.share_buffer(buffer, 3, rank, saved=saved)
        shares.append(buffer.samples[:, 0, 0, 0].tolist())
    # as saved: exact resume
    assert shares == [list(range(0, 33)), list(range(33, 66)), list(range(66, 99))]
    buffer = ebm.ReplayBuffer(50, (3, 32, 32), "cpu")
    # more slots than the saved chains: they repeat
    ebm.share_buffer(buffer, 2, 1, saved=saved[:99])
    assert buffer.samples[:, 0, 0, 0].tolist() == [*range(50, 99), 0.0]


def test_ebm_trains_on_unflipped_images_as_igebm(tiny_images, tmp_path, monkeypatch):
    """IGEBM's unconditional run does not augment. Bug it catches: the random flips of the shared
    loader."""
    seen = []
    loader = common.DeviceLoader
    monkeypatch.setattr(common, "DeviceLoader",
                        lambda *a, **k: seen.append(k.get("flip", True)) or loader(*a, **k))
    ebm.main(train_args("ebm", tiny_images, tmp_path, "--epochs", 1))
    assert seen == [False]


def test_ebm_sample_inpaint_and_eval(tiny_images, tmp_path):
    run = ebm.main(train_args("ebm", tiny_images, tmp_path, "--epochs", 1))
    # the buffer and a chain
    assert (run / "samples" / "epoch_0001.png").read_bytes()[:4] == b"\x89PNG"
    last_row = common.read_metrics(run)[-1]
    assert ({"energy_pos", "energy_neg", "gap", "grad_norm", "sgld_grad_norm", "lr"}
            <= set(common.read_metrics(run)[-2]))
    assert "test_energy" in last_row
    ebm.main(["--sample", str(run), "--n", "12", "--steps", "2"])
    samples = np.load(run / "samples.npz")["samples"]
    assert (samples.shape == (12, 32, 32, 3) and samples.dtype == np.uint8
            and (run / "samples.png").exists())
    run_script("experiments/ebm_inpaint.py", run, "--steps", 2)
    assert (run / "inpaint.png").read_bytes()[:4] == b"\x89PNG"
    ebm.main(["--eval", str(run), "--n", "16", "--steps", "2", "--fid-extractor", "tiny-random"])
    result = json.loads((run / "eval.json").read_text())
    assert (result["n_samples"] == 16 and math.isfinite(result["fid"])
            and result["nfe_per_sample"] == 2)
    assert math.isfinite(result["energy_test"]) and math.isfinite(result["energy_samples"])


def test_ebm_chains_measures_have_known_answers():
    # bugs this catches: a true density that does not integrate to 1 (a dropped 1/3 or std^2),
    # weights normalised over the grid instead of the modes, the reweighting applied the wrong way
    # round, and a blob at the origin read as mass on the modes
    points, area = ebm_chains.grid(60)
    for name in ebm_chains.TOYS:
        p = ebm_chains.true_density(name, points)
        assert p.sum().item() * area == pytest.approx(1, abs=0.01)
        exact = ebm_chains.compare(name, p, points)
        assert exact["tv"] < 1e-9 and exact["weight_tv"] < 1e-9 and exact["shape_tv"] < 1e-9
        assert exact["location_std"] < 1e-9 and exact["covered"] == exact["modes"]
        assert exact["off_mode"] < 1e-3 and exact["origin"] < 1e-6
    p = ebm_chains.true_density("8gaussians", points)
    region, _ = ebm_chains.mode_regions("8gaussians", points)
    heavier = ebm_chains.compare("8gaussians", p * torch.where(region == 0, 2.0, 1.0), points)
    # mode 0 holds 2/9 of the modes' mass instead of 1/8, the others 1/9:
    # weight tv = (7/72 + 7/72) / 2
    assert heavier["weight_tv"] == pytest.approx(7 / 72, abs=1e-3)
    assert heavier["shape_tv"] < 1e-6 and heavier["location_std"] < 1e-6 and heavier["tv"] > 0.05
    gone = ebm_chains.compare("8gaussians", p * torch.where(region == 0, 0.1, 1.0), points)
    assert gone["covered"] == 7
    # half the mass in a blob at the centre of the rings, where p is about 0: the rings keep their
    # proportions (weight_tv 0, all covered), so only off_mode and origin (and tv) can show it
    points, area = ebm_chains.grid(200)
    rings = ebm_chains.true_density("rings", points)
    blob = torch.exp(-points.pow(2).sum(1) / (2 * 0.1**2)) / (2 * math.pi * 0.1**2)
    blobbed = ebm_chains.compare("rings", rings + blob, points)
    assert blobbed["weight_tv"] < 1e-3 and blobbed["covered"] == 3
    assert blobbed["off_mode"] == pytest.approx(0.5, abs=0.01)
    assert blobbed["origin"] == pytest.approx(0.5, abs=0.01) and blobbed["tv"] > 0.45


def test_ebm_chains_locations_coverage_and_sample_measures_have_known_answers():
    # bugs this catches: a mode's shift not measured in data stds, "covered" requiring a mode's
    # full weight (or half) instead of a quarter, the samples' mode shares taken over all points
    # (off-mode ones too), and a point inside the smallest ring or outside the largest measured
    # from a ring of radius 0 or 4, which does not exist
    points, _ = ebm_chains.grid(200)
    p = ebm_chains.true_density("8gaussians", points)
    shifted = ebm_chains.true_density("8gaussians", points - torch.tensor([0.05, 0.0]).double())
    # every mode moves by 0.05 = 1/3 of a std (a little less: the 4-std regions cut its tails)
    assert ebm_chains.compare("8gaussians", shifted, points)["location_std"] == pytest.approx(
        1 / 3, abs=0.01)
    region, _ = ebm_chains.mode_regions("8gaussians", points)
    # mode 0 at weight w against 1 for the others holds w / (7 + w) of the modes' mass: covered
    # (a quarter of 1/8 at least) from w = 7/31 = 0.226; a heavier mode leaves the others covered
    assert [ebm_chains.compare("8gaussians", p * torch.where(region == 0, w, 1.0), points)[
        "covered"] for w in (0.2, 0.3, 2.0)] == [7, 8, 8]
    angle = torch.arange(8, dtype=torch.float64) * math.pi / 4
    centres = 2 * torch.stack([angle.cos(), angle.sin()], 1)
    # 30 points on mode 0, 10 on each other, 20 at the origin (13 stds from every centre)
    samples = torch.cat([centres[:1].repeat(30, 1), centres[1:].repeat_interleave(10, 0),
                         torch.zeros(20, 2, dtype=torch.float64)])
    measured = ebm_chains.compare_samples("8gaussians", samples)
    # the modes' shares 0.3 and 7 x 0.1 against 1/8 each: (0.175 + 7 x 0.025) / 2
    assert measured["samples_weight_tv"] == pytest.approx(0.175)
    assert measured["samples_off_mode"] == pytest.approx(1 / 6)
    assert measured["samples_far"] == pytest.approx(1 / 6)
    # 12 points on each ring, 6 at radius 0.2 and 6 at 3.8: 10 ring stds (0.08) from the rings
    circle = torch.stack([angle.cos(), angle.sin()], 1).repeat(2, 1)[:12]
    rings = torch.cat([circle, 2 * circle, 3 * circle, 0.2 * circle[:6], 3.8 * circle[:6]])
    measured = ebm_chains.compare_samples("rings", rings)
    assert measured["samples_weight_tv"] < 1e-6
    assert measured["samples_off_mode"] == measured["samples_far"] == pytest.approx(0.25)


def test_ebm_chains_experiment_runs_at_a_tiny_size_with_equal_negatives_and_updates(tmp_path):
    results = ebm_chains.main(["--iterations", "30", "--seeds", "1", "--grid", "30",
                               "--out", str(tmp_path), "--figure", str(tmp_path / "chains.png")])
    runs = [r for r in results if r["scheme"] != "data"]
    assert len(runs) == len(ebm_chains.TOYS) * len(ebm_chains.SCHEMES)
    # every scheme: the data batch of negatives per update and the same number of updates; the
    # evaluations they cost follow from the chains' length alone
    assert {(r["updates"], r["chains"]) for r in runs} == {(30, ebm_chains.TOY["batch"])}
    assert all(r["sgld_evaluations"] == 30 * ebm_chains.TOY["batch"] * r["steps"] for r in runs)
    assert ({r["steps"] for r in runs} == {10, 100}
            and {r["restart_rate"] for r in runs} == {0.05, 1.0})
    for r in results:
        assert all(0 <= r[k] <= 1 for k in ebm_chains.MEASURES
                   if k not in ("location_std", "covered"))
        assert r["origin"] <= r["off_mode"] + 1e-9 and 0 <= r["covered"] <= r["modes"]
    data = [r for r in results if r["scheme"] == "data"]
    assert (len(data) == len(ebm_chains.TOYS)
            and all(r["tv"] < 1e-9 and r["off_mode"] < 1e-3 for r in data))
    assert all(r["samples_off_mode"] < 0.01 and r["samples_weight_tv"] < 0.1 for r in data)
    assert all(r["samples_far"] < 0.03 for r in data)  # 3 std: about 1% (8gaussians), 0.3% (rings)
    table = (tmp_path / "table.md").read_text()
    header = table.splitlines()[0]  # every measure and both costs are published, none dropped
    assert all(k in header for k in (*ebm_chains.MEASURES, "SGLD evaluations", "cpu_seconds"))
    assert all(s in table for s in (*ebm_chains.SCHEMES, "data"))
    assert len(table.splitlines()) == 2 + len(results)  # one row per toy and scheme, seed 1 only
    assert (tmp_path / "chains.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))


def test_ebm_toy_experiment_writes_its_figure(tmp_path, monkeypatch):
    monkeypatch.setitem(ebm_toy.TOY, "iterations", 30)
    ebm_toy.main(["--data", "rings", "--run-dir", str(tmp_path)])
    run = only_run(tmp_path)
    assert (run / "toy.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "toy.json").read_text())["data"] == "rings"


def official_parameter_count(w):
    """IGEBM's ResNet32Large (models.py, utils.py of openai/ebm_code_release) counted from its
    layout, not from our code: stem 3x3 conv without bias; per block conv1 (3x3) + its input bias,
    conv2 (3x3) + input bias + output gain, a 3x3 shortcut conv where the channels change;
    fc 4w -> 1. Our conv1 bias is per output channel instead of per input channel, which adds
    c_out - c_in where the channels change."""
    blocks = ([(w, w)] * 3 + [(w, 2 * w)] + [(2 * w, 2 * w)] * 2 + [(2 * w, 4 * w)]
              + [(4 * w, 4 * w)] * 2)
    total = 9 * 3 * w + 4 * w + 1
    for c_in, c_out in blocks:
        total += (9 * c_in * c_out + c_in + 9 * c_out * c_out + 2 * c_out
                  + (9 * c_in * c_out if c_in != c_out else 0))
    return total, sum(c_out - c_in for c_in, c_out in blocks)


def test_ebm_default_network_is_igebms_unconditional_resnet32large():
    # bugs this catches: the conditional ResNet32 (6 blocks, 2 widths), a missing block,
    # downsampling in the wrong block, a 1x1 shortcut, spectral norm on the final linear layer, a
    # conv left without spectral norm
    net = ebm.EnergyNet(8)
    blocks = list(net.blocks)
    assert len(blocks) == 9
    assert [b.conv1.out_channels for b in blocks] == [8] * 3 + [16] * 3 + [32] * 3
    sizes, x = [], torch.rand(2, 3, 32, 32)
    hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for b in blocks]
    assert net.eval()(x).shape == (2,)
    # the first block of each width halves the resolution
    assert sizes == [16, 16, 16, 8, 8, 8, 4, 4, 4]
    [h.remove() for h in hooks]
    shortcuts = [i for i, b in enumerate(blocks) if isinstance(b.skip, torch.nn.Conv2d)]
    assert shortcuts == [3, 6] and all(blocks[i].skip.kernel_size == (3, 3) for i in shortcuts)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert (len(convs) == 1 + 2 * 9 + 2
            and all(parametrize.is_parametrized(c, "weight") for c in convs))
    assert not parametrize.is_parametrized(net.head) and net.head.in_features == 32
    # the size: 18.6M at width 128, and 384 more than IGEBM's own count (our conv1 bias, see above)
    official, extra = official_parameter_count(128)
    assert official == 18_591_105 and extra == 384
    assert sum(p.numel() for p in ebm.EnergyNet(128).parameters()) == official + extra
    assert sum(p.numel() for p in net.parameters()) == sum(official_parameter_count(8))


def test_ebm_blocks_start_as_the_identity_because_conv2_is_zero_and_only_bounded():
    # bug this catches: conv2 spectral-normalised as W / sigma (plain SN), which blows its 1e-10
    # initial weights up to norm 1; or conv2 not zero-initialised. Either way a block would no
    # longer start as silu(x).
    torch.manual_seed(0)
    net = ebm.EnergyNet(8).eval()
    for block in net.blocks:
        assert block.conv2.weight.abs().max() < 1e-6
    block, x = net.blocks[1], torch.randn(4, 8, 16, 16)  # an identity-shortcut block, no pooling
    assert torch.allclose(block(x), torch.nn.functional.silu(x), atol=1e-5)


def test_ebm_spectral_norm_divides_by_the_largest_singular_value():
    # bugs this catches: dividing by sigma^2 or by the Frobenius norm, a power iteration that does
    # not converge (u and v swapped), the bounded variant scaling small weights up
    torch.manual_seed(0)
    conv = ebm.spectral_norm(torch.nn.Conv2d(16, 32, 3))
    for _ in range(200):  # power iterations in training mode (slow to converge on a random matrix)
        weight = conv.weight
    assert (torch.linalg.matrix_norm(weight.detach().flatten(1), 2).item()
            == pytest.approx(1, abs=3e-3))
    small = torch.nn.Conv2d(16, 32, 3)
    torch.nn.init.normal_(small.weight, std=1e-3)  # spectral norm well below 1
    original = small.weight.detach().clone()
    small = ebm.spectral_norm(small, at_most_one=True)
    assert torch.allclose(small.weight, original)  # left alone
    big = ebm.spectral_norm(torch.nn.Conv2d(16, 32, 3), at_most_one=True)
    with torch.no_grad():
        big.parametrizations.weight.original.mul_(100)
    for _ in range(200):
        weight = big.weight
    assert (torch.linalg.matrix_norm(weight.detach().flatten(1), 2).item()
            == pytest.approx(1, abs=3e-3))
    # eval mode: no power iteration, so measuring does not change the model
    u = big.parametrizations.weight[0].u.clone()
    _ = big.eval().weight
    assert torch.equal(big.parametrizations.weight[0].u, u)


def test_ebm_sgld_computes_the_normalised_weights_once_per_chain():
    # bug this catches: SGLD recomputing every spectral norm (and its power iteration) at every one
    # of its K steps
    net = ebm.EnergyNet(4).requires_grad_(False)
    calls = []
    for module in net.modules():
        if isinstance(module, ebm.SpectralNorm):
            module.register_forward_hook(lambda *a: calls.append(1))
    layers = sum(isinstance(m, ebm.SpectralNorm) for m in net.modules())
    ebm.sgld(net, torch.rand(2, 3, 32, 32), 5, 10.0, 0.005, 0.01)
    assert len(calls) == layers  # once per layer for the whole chain, not 5 times


def test_ebm_ema_copies_the_spectral_norms_state_and_is_the_network_at_decay_0():
    """--ema 0 (IGEBM's setting): the averaged network is the network, power-iteration vectors
    included."""
    torch.manual_seed(0)
    net = ebm.EnergyNet(4)
    ema = ebm.EnergyNet(4).requires_grad_(False)
    net(torch.rand(2, 3, 32, 32))  # a power-iteration step in training mode moves u and v
    ebm.update_ema(ema, net, 0.0, step=5)
    assert all(torch.equal(a, b)
               for a, b in zip(ema.state_dict().values(), net.state_dict().values()))


def test_ebm_training_chains_run_with_dropout_on_as_igebm(tiny_images, tmp_path):
    # bug this catches: net.eval() around the training chains, which would switch dropout off there
    # (IGEBM's training graph samples with train=True); and dropout left on where samples are drawn
    # for evaluation
    args = ebm.parse_args(train_args("ebm", tiny_images, tmp_path))
    net, _, optimizer, scaler = ebm.build(args, torch.device("cpu"))
    buffer = ebm.ReplayBuffer(64, (3, 32, 32), "cpu")
    seen, dropout = [], ebm.dropout
    ebm.dropout = lambda h, p, training: seen.append(training) or dropout(h, p, training)
    try:
        ebm.train_step(net, net, optimizer, scaler, buffer, torch.rand(16, 3, 32, 32), args, None)
        assert len(seen) == 9 * (args.sgld_steps + 1) and all(seen)  # K chain steps and the update
        seen.clear()
        ebm.draw_samples(net.eval(), {"buffer": buffer.samples}, 4,
                         ebm.parse_args([*TINY["ebm"], "--steps", "2"]), torch.device("cpu"), None)
        assert seen and not any(seen)
    finally:
        ebm.dropout = dropout


def test_ebm_cpu_dropout_keeps_the_mean_and_drops_the_fraction_p():
    # bugs this catches: a mask keeping p instead of 1 - p, a missing 1 / (1 - p) rescaling, dropout
    # in eval mode
    torch.manual_seed(0)
    h = torch.ones(200_000)
    out = ebm.dropout(h, 0.3, True)
    assert (out == 0).float().mean().item() == pytest.approx(0.3, abs=0.005)
    assert out.mean().item() == pytest.approx(1, abs=0.01)
    assert torch.equal(ebm.dropout(h, 0.3, False), h)


@pytest.mark.skipif(not REAL_DATA.exists(),
                    reason="the shared CIFAR-10 JPEG copy is not on this machine")
def test_ebm_short_run_on_real_cifar10_stays_finite(tmp_path):
    """A smoke test on the real images. (It does not ask for E(data) < E(negatives): at width 8
    the gap after 20-40 steps is 0.0003 +- 0.001, the same sign as noise, at lr 1e-3 to 1e-2.)"""
    run_script("ebm.py", "--data", REAL_DATA, "--data-root", ROOT / "data", "--run-dir", tmp_path,
               "--width", "8", "--sgld-steps", "5", "--batch-size", "32", "--limit-train", "320",
               "--limit-test", "100", "--epochs", "2", "--lr", "1e-3", "--device", "cpu",
               "--log-every", "5")
    run = only_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    rows = [r for r in common.read_metrics(run) if "energy_pos" in r]
    assert summary["rollbacks"] == 0 and rows[-1]["step"] == 20
    assert all(math.isfinite(r["energy_pos"]) and math.isfinite(r["energy_neg"]) for r in rows)
    assert (run / "checkpoint.pt").exists() and (run / "samples" / "epoch_0002.png").exists()


def ebm_step(max_energy=1000.0):
    """One ebm.train_step on 16 images k / 255 (every value 0..255 present), with a network spy:
    (what the network scored: 16 positives then 16 negatives, the slots the chains came from, the
    buffer after the step, the weights before and after, bad)."""
    torch.manual_seed(0)
    args = ebm.parse_args([*TINY["ebm"], "--max-energy", str(max_energy), "--restart-rate", "0"])
    net, _, optimizer, scaler = ebm.build(args, torch.device("cpu"))
    buffer = ebm.ReplayBuffer(16, (3, 32, 32), "cpu", restart_rate=0.0)
    seen, sample = {}, buffer.sample

    def sampling(n):  # the buffer's draw, recording the slots
        seen["x_neg"], seen["slots"] = sample(n)
        return seen["x_neg"], seen["slots"]

    buffer.sample = sampling
    x = torch.arange(16 * 3072).remainder(256).view(16, 3, 32, 32).float() / 255
    before = [p.detach().clone() for p in net.parameters()]

    def scoring(v):  # the network, recording what it scores
        seen["scored"] = v
        return net(v)

    _, bad = ebm.train_step(scoring, net, optimizer, scaler, buffer, x, args, None)
    return seen["scored"], seen["slots"], buffer.samples, before, list(net.parameters()), bad


def test_ebm_positives_are_dequantized_within_their_bins():
    """x+ = (k + u) / 256, u ~ U(0, 1): every value lies in its own bin [k / 256, (k + 1) / 256)
    (up to float32's rounding), and u is uniform there for each k: over the 192 pixels of each
    value, std 1/sqrt(12) = 0.289 (its standard error 0.015; over 20 seeds the 256 values' stds
    ranged 0.242-0.322, the bounds are 0.2 and 0.38). Bug it catches: no dequantization
    noise (u is then k / 255 for every pixel of value k: std 0 within a bin, though over all k its
    mean and std look uniform)."""
    scored, *_ = ebm_step()
    k = torch.arange(16 * 3072).remainder(256).view(16, 3, 32, 32).float()
    u = scored[:16] * 256 - k
    assert ((u > -1e-4) & (u < 1 + 1e-4)).all() and abs(u.mean().item() - 0.5) < 0.01
    per_value = u.flatten().view(-1, 256).std(0)  # column k: the pixels of value k
    assert ((per_value > 0.2) & (per_value < 0.38)).all(), per_value.aminmax()


def test_ebm_chains_persist_in_the_replay_buffer():
    """The negatives the loss scores are pushed back into the slots they came from: the next
    update continues those chains (persistent CD). Bug it catches: the push left out (every update
    then restarts from the buffer's first noise: short-run chains of K steps, not IGEBM's)."""
    scored, slots, samples, *_ = ebm_step()
    assert torch.equal(samples[slots], scored[16:])


def test_ebm_a_step_whose_energies_exceed_the_bound_changes_nothing():
    """Finite energies beyond --max-energy are a divergence: the step is reported bad and skipped,
    weights untouched. Bug it catches: the loss not turned into NaN for such a step (only
    non-finite energies would be skipped, and a runaway energy would keep training)."""
    *_, before, after, bad = ebm_step(max_energy=1e-9)
    assert bad and all(torch.equal(a, b) for a, b in zip(before, after))


# ------------------------------------------------------------------------------------------------
# experiments/likelihood.py: one likelihood axis, checked where the answer is known
# ------------------------------------------------------------------------------------------------

SIGMA_L, SIGMA_1 = 0.01, 50.0  # the ODE's ends, as NCSNv2's ladder
MIXTURE_SIGMA_MAX = 200.0  # the prior's variance mismatch on the mixture: 0.023 nats/dim at 50


def likelihood_gaussian(shape, seed, n=8):
    """N(mean, diag(variance)) with standard deviations from 0.01 to 0.3, and n points from it."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.rand(shape, generator=g, dtype=torch.float64)
    variance = 0.1 * torch.rand(shape, generator=g, dtype=torch.float64) ** 4 + 1e-4
    x = mean + variance.sqrt() * torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return mean, variance, x


def likelihood_mixture_points(seed):
    """Six points of NCSN's 2-D mixture and two between its modes, where the score turns."""
    data = toys.toy_data("mixture", 6, torch.Generator().manual_seed(seed)).double()
    return torch.cat([data, torch.tensor([[0.0, 0.0], [1.0, -2.0]], dtype=torch.float64)])


# ------------------------------------------------------------------------------------------------
# Eq. (1): dequantisation and bits per dimension
# ------------------------------------------------------------------------------------------------

def test_likelihood_bits_per_dim_constants():
    """Bug: a wrong constant in Eq. (1) (log 255 or log 128 for log 256, bits and nats mixed up).
    The uniform density on [0, 1]^D (log p = 0) is 8 bits/dim exactly; a density of 256^D on one
    bin is 0 bits/dim."""
    assert likelihood.bits_per_dim_from_density(torch.tensor(0.0)).item() == pytest.approx(8.0)
    one_bin = torch.tensor(common.IMAGE_DIMS * math.log(256))
    assert likelihood.bits_per_dim_from_density(one_bin).item() == pytest.approx(0.0, abs=1e-12)


def test_likelihood_dequantised_points_stay_in_their_bins():
    """Bug: dequantising by (k + u) / 255 or k / 255 + u / 256, which moves points out of their
    bins. Every x must lie in [k / 256, (k + 1) / 256)."""
    k = torch.arange(256, dtype=torch.uint8).repeat(20)
    x = likelihood.dequantise(k, torch.Generator().manual_seed(0))
    assert ((x >= k / 256) & (x < (k.double() + 1) / 256)).all()


# ------------------------------------------------------------------------------------------------
# The probability-flow ODE against closed forms
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_likelihood_ode_matches_gaussian_closed_form(seed):
    """Bugs: the divergence term's sign flipped or dropped, the prior term dropped (each errs by
    nats per dimension). log p_sigma_min of N(mean, diag(variance)) in 6 dimensions, exact
    divergence, within 0.01 nats per dimension of the closed form (measured: < 3e-4)."""
    mean, variance, x = likelihood_gaussian((6,), seed)
    log_p, _ = likelihood.ode_log_prob(likelihood.gaussian_score(mean, variance), x, SIGMA_L,
                                       SIGMA_1, exact=True, prior_mean=mean)
    truth = likelihood.gaussian_log_prob(x, mean, variance, SIGMA_L)
    assert ((log_p - truth) / 6).abs().max() < 0.01


def test_likelihood_ode_bits_per_dim_on_image_shaped_gaussian():
    """Bugs: the prior's normalising constant counted per image instead of per dimension, a probe
    of the wrong shape, the divergence's sign. Images (B, 3, 32, 32) with a Rademacher probe,
    exact here because the Jacobian is diagonal: the ODE's bits/dim within 0.01 nats per dimension
    (0.014 bits/dim) of the closed form's (measured: < 1e-4 nats)."""
    mean, variance, x = likelihood_gaussian((3, 32, 32), 0, n=4)
    log_p, _ = likelihood.ode_log_prob(likelihood.gaussian_score(mean, variance), x, SIGMA_L,
                                       SIGMA_1, prior_mean=mean)
    truth = likelihood.gaussian_log_prob(x, mean, variance, SIGMA_L)
    bits = likelihood.bits_per_dim_from_density(log_p)
    expected = likelihood.bits_per_dim_from_density(truth)
    assert (bits - expected).abs().max() < 0.01 / math.log(2)


@pytest.mark.parametrize("seed", [0, 1])
def test_likelihood_ode_matches_mixture_closed_form(seed):
    """Bugs: the divergence's sign, a missing sigma^2 factor in dI/dt (the clock is log sigma),
    the prior dropped. NCSN's 2-D mixture (toys.mixture_log_prob): the exact-divergence ODE is
    within 0.01 nats per dimension of log p_sigma_min at data points and between the modes
    (measured over 20 seeds: < 0.0015 at sigma_max = 200, nearly all of it the prior's)."""
    x = likelihood_mixture_points(seed)
    log_p, _ = likelihood.ode_log_prob(likelihood.mixture_score, x, SIGMA_L, MIXTURE_SIGMA_MAX,
                                       exact=True, prior_mean=likelihood.MIXTURE_MEAN)
    assert ((log_p - toys.mixture_log_prob(x, SIGMA_L)) / 2).abs().max() < 0.01


def test_likelihood_hutchinson_is_unbiased():
    """Bug: a biased trace estimator (a probe without unit variance, such as {0, 1} for {-1, 1},
    or eps^T J eps summed over the wrong axis). On the mixture, where the Jacobian is not
    diagonal, 50 probes per point (one solve of 50 copies of the 8 points, each copy its own
    probe) average within 4 standard errors of the exact-divergence ODE at every point
    (measured over 10 seeds: worst 2.7), and the probes do vary (else this tests nothing)."""
    x, prior_mean = likelihood_mixture_points(0), likelihood.MIXTURE_MEAN
    exact, _ = likelihood.ode_log_prob(likelihood.mixture_score, x, SIGMA_L, MIXTURE_SIGMA_MAX,
                                       True, prior_mean=prior_mean)
    copies, _ = likelihood.ode_log_prob(likelihood.mixture_score, x.repeat(50, 1), SIGMA_L,
                                        MIXTURE_SIGMA_MAX, prior_mean=prior_mean)
    probes = copies.view(50, len(x))
    standard_error = probes.std(0) / math.sqrt(len(probes))
    assert (standard_error > 1e-3).all()
    assert ((probes.mean(0) - exact).abs() < 4 * standard_error).all()


# ------------------------------------------------------------------------------------------------
# Annealed importance sampling against a known Z and quadrature
# ------------------------------------------------------------------------------------------------

CENTRES = 2 * torch.stack([torch.cos(torch.arange(8) * math.pi / 4),
                           torch.sin(torch.arange(8) * math.pi / 4)], 1)
WIDTH, LOG_Z, BOX = 0.15, math.log(3.0), (-4.0, 4.0)


def ring_energy(x):
    """E with exp(-E) = 3 x (an equal mixture of N(c_j, 0.15^2 I) on a circle of radius 2): Z = 3
    (the mass outside the box [-4, 4]^2, 13 standard deviations away, is negligible)."""
    sq = ((x[:, None, :] - CENTRES) ** 2).sum(-1)
    log_density = torch.logsumexp(-sq / (2 * WIDTH**2), 1) - math.log(8 * 2 * math.pi * WIDTH**2)
    return -(log_density + LOG_Z)


def ring_samples(n, g):
    """Exact samples of exp(-E) / Z of ring_energy."""
    return CENTRES[torch.randint(0, 8, (n,), generator=g)] + WIDTH * torch.randn(n, 2, generator=g)


def test_likelihood_ais_weights_are_unbiased():
    """Bugs: the AIS weight taken after the MALA move instead of before it, beta_k in place of
    beta_k - beta_k-1, the base's volume left out. E[w] = Z for any K: at K = 10 the mean weight
    of 20,000 forward chains from the uniform box is Z within 4 standard errors (measured over
    10 seeds: |z| <= 1.8). (The reverse run is not tested here: its weights are so heavy-tailed
    that single runs of 5,000 chains at K = 100 fell below log Z in 7 of 30 seeds.)"""
    g = torch.Generator().manual_seed(0)
    start = torch.rand(20000, 2, generator=g) * 8 - 4
    betas = torch.linspace(0, 1, 11).tolist()
    log_w, _, _ = likelihood.ais(ring_energy, start, betas, BOX, 0.03, g)
    w = (log_w - LOG_Z).exp()
    assert abs(w.mean().item() - 1) < 4 * w.std().item() / math.sqrt(len(w))


def test_likelihood_mala_leaves_its_target_invariant():
    """Bugs: MALA without its Metropolis correction or without the proposal's asymmetry term
    log q(x|y) - log q(y|x), or moves out of the box clamped instead of rejected. From exact
    samples of the ring at a step where unadjusted Langevin would inflate each mode's variance
    threefold, 20 steps keep the mean squared distance to the nearest centre at 2 * 0.15^2
    within 5% (measured over 10 seeds: 0.972 to 1.007 of it); on a flat energy over [0, 1]^2 no
    point leaves the box or sticks to its edge: 19% lie within 0.05 of it, as for the uniform
    (measured: 0.186 to 0.198)."""
    g = torch.Generator().manual_seed(0)
    x = ring_samples(5000, g)
    e, grad = likelihood.energy_and_grad(ring_energy, x)
    for _ in range(20):
        x, e, grad, _ = likelihood.mala_step(ring_energy, x, e, grad, 1.0, BOX, 0.03, g)
    nearest = torch.cdist(x, CENTRES).min(1).values ** 2
    assert nearest.mean().item() == pytest.approx(2 * WIDTH**2, rel=0.05)
    flat = lambda v: 0 * v.sum(1)  # noqa: E731
    x = torch.rand(5000, 2, generator=g)
    e, grad = likelihood.energy_and_grad(flat, x)
    for _ in range(20):
        x, e, grad, _ = likelihood.mala_step(flat, x, e, grad, 1.0, (0.0, 1.0), 0.01, g)
    assert ((x > 0) & (x < 1)).all()
    assert ((x < 0.05) | (x > 0.95)).any(1).float().mean().item() == pytest.approx(0.19, abs=0.03)


def test_likelihood_ais_on_the_ebm_toy_matches_quadrature():
    """Bugs: wrong AIS weights or box volume, on the real `ebm.py --toy` network (trained 300
    iterations: its mass spread over all 8 modes). Quadrature on a 500^2 grid (converged to
    1e-7 nats) against AIS with K = 100 and 1,000 chains: within 0.3 nats (measured over 5 seeds:
    mean error +0.005, sd 0.08)."""
    energy, half_width = likelihood.load_toy_energy("8gaussians", iterations=300, seed=1)
    log_z, _ = likelihood.grid_log_partition(energy, half_width, 500)
    g = torch.Generator().manual_seed(0)
    start = (2 * torch.rand(1000, 2, generator=g) - 1) * half_width
    betas = torch.linspace(0, 1, 101).tolist()
    log_w, _, acceptance = likelihood.ais(energy, start, betas, (-half_width, half_width), 0.03, g)
    assert 0.3 < acceptance < 0.95
    assert abs(likelihood.log_mean_exp(log_w) - log_z) < 0.3


def test_likelihood_rows_turn_known_densities_into_their_bits_per_dim(tiny_images, tmp_path,
                                                                     monkeypatch):
    """Bugs it catches in the rows' glue: the VAE's bound in nats per dimension (no ln 2), the
    EBM's log Z added instead of subtracted, NCSN's ODE run from the pixels k / 255 instead of the
    dequantised points (k + u) / 256, and the held-out images taken from the training split. Each
    model's loader is replaced by a density whose bits/dim are known."""
    args = argparse.Namespace(data=str(tiny_images), data_root=str(tmp_path))
    dims = common.IMAGE_DIMS  # 3072
    # VAE: the uniform distribution over the 256 levels of every subpixel: 8 bits/dim exactly
    monkeypatch.setattr(likelihood, "load_vae", lambda run, device: (
        lambda images, k: torch.full((len(images),), -dims * math.log(256)), args))
    row = likelihood.vae_row(tmp_path, 4, 2, 2, "cpu")
    assert row["n"] == 4 and row["bits_per_dim"] == pytest.approx(8)
    # EBM: E = 3072 everywhere, so Z = exp(-3072) on the unit cube and p is uniform: 8 bits/dim
    monkeypatch.setattr(likelihood, "load_ebm", lambda run, device: (
        lambda x: 0 * x.flatten(1).sum(1) + dims, args))
    row = likelihood.ebm_row(tmp_path, 4, 5, 8, 2, 0.01, 2, "cpu")
    assert row["log_z"] == pytest.approx(-dims) and row["bits_per_dim"] == pytest.approx(8)
    # NCSN: the score of N(0, 0.01 I): the closed form at the same dequantised test images (the
    # ODE within 0.001 bits/dim, measured; pixels k / 255 instead: 0.05 away)
    monkeypatch.setattr(likelihood, "load_ncsn", lambda run, device: (
        likelihood.gaussian_score(0.0, 0.01), 0.01, 50.0, args))
    row = likelihood.ncsn_row(tmp_path, 4, 4, "cpu")
    x = likelihood.dequantise(common.load_images(str(tiny_images), str(tmp_path), "test")[:4],
                              torch.Generator().manual_seed(0))
    log_p = likelihood.gaussian_log_prob(x, 0.0, torch.tensor(0.01), 0.01)
    expected = likelihood.bits_per_dim_from_density(log_p).mean().item()
    assert row["bits_per_dim"] == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("model", ["ncsn", "ebm", "vae"])
def test_likelihood_command_line_on_a_tiny_run(model, tiny_images, tmp_path):
    """Bug: the run loaders out of step with the model files. Train one tiny epoch, then
    `python -m experiments.likelihood MODEL RUN --n 4` writes RUN/likelihood.json with finite
    bits/dim. The EBM's energies are still near 0, so exp(-E) / Z is nearly uniform on the cube: 8
    bits/dim within 0.01."""
    run = MODELS[model].main(train_args(model, tiny_images, tmp_path, "--epochs", 1))
    asked = {"ncsn": [], "vae": ["--iw-samples", "10"],
             "ebm": ["--ais-steps", "20", "--chains", "8", "--repeats", "2"]}[model]
    proc = subprocess.run([sys.executable, "-m", "experiments.likelihood", model, str(run),
                           "--n", "4", "--device", "cpu", *asked], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads((run / "likelihood.json").read_text())
    assert row["n"] == 4 and math.isfinite(row["bits_per_dim"]) and row["bits_per_dim"] > 0
    if model == "ebm":
        assert row["bits_per_dim"] == pytest.approx(8.0, abs=0.01)




# ------------------------------------------------------------------------------------------------
# experiments/: the precision and OOD measurements, and .ci/gpu, run at tiny size
# ------------------------------------------------------------------------------------------------

def test_harness_children_name_their_failure_and_the_laptop_report_keeps_recorded_rows(
        tiny_images, tmp_path, monkeypatch, capsys):
    """Bugs it catches: a harness's child that fails with its output thrown away (a run recorded
    as 'exit 256', the reason lost), and ncsn_laptop's report crashing in a clone that lacks the
    run folders its record names instead of keeping their recorded scores."""
    from experiments import equal_time, ncsn_laptop

    proc = equal_time.launch(["-c", "import sys; print('busy'); sys.exit('ncsn.py: error: why')"],
                             tmp_path / "child.log")
    assert equal_time.exit_code(os.wait4(proc.pid, 0)[1], tmp_path / "child.log") == 1
    assert "failed (exit 1): ncsn.py: error: why" in capsys.readouterr().err
    recorded = {"run": "runs/gone-fast", "steps": 500, "cpu_seconds": 872.0, "outside_0_1": 0.754,
                "pixel_w1": 0.231, "spectrum_log_ratio": 1.17, "q1_by_epoch": [1538.7, 17.5, 4.7],
                "test_dsm_by_epoch": [1536.0, 150.0, 140.4]}
    (tmp_path / "laptop.json").write_text(json.dumps(
        {"fast": recorded, "sigma10": {"run": "runs/gone-sigma10", "steps": 500,
                                       "cpu_seconds": 737.0}}))
    monkeypatch.setattr(ncsn_laptop, "ROOT", tmp_path)
    monkeypatch.setattr(ncsn_laptop, "JPEG", str(tiny_images))
    ncsn_laptop.report(record_path=tmp_path / "laptop.json", figure=tmp_path / "laptop.png")
    table = (tmp_path / "laptop.md").read_text().splitlines()
    assert len(table) == 4  # the header, its rule, fast's recorded row, the test images' row
    assert table[2] == ("| lr 1e-3, EMA 0.99 | 500 | 872 | 17.5 / 4.7 | 140.4 | 0.754 | 0.231 | "
                        "1.17 |")
    assert "sigma10: runs/gone-sigma10 is not here and has no scores" in capsys.readouterr().out
    assert (tmp_path / "laptop.png").read_bytes()[:4] == b"\x89PNG"


def test_harness_runner_records_every_child_and_keeps_the_record(tmp_path, monkeypatch, capsys):
    """run_children, which equal_time, ncsn_laptop and ncsn_techniques share. Bugs it catches: a
    failed child recorded with the raw wait status (256) or without its reason, a child's run
    folder or its harness's own fields (epochs, ...) missing from its row, and a record file whose
    earlier rows are dropped when a new run is written into it."""
    from experiments import equal_time

    monkeypatch.setattr(equal_time, "ROOT", tmp_path)  # children run in tmp_path, runs/ under it
    (tmp_path / "runs").mkdir()
    where = tmp_path / "record.json"
    where.write_text(json.dumps({"earlier": {"run": "runs/earlier__1", "exit_status": 0}}))
    jobs = [("one", ["-c", "import os; os.makedirs('runs/one__1')"], tmp_path / "one.log",
             "one__*", {"epochs": 3}),
            ("bad", ["-c", "import sys; sys.exit('ebm.py: error: why')"], tmp_path / "bad.log",
             "bad__*", {"epochs": 1}),
            ("two", ["-c", "import os, time; time.sleep(0.3); os.makedirs('runs/two__1')"],
             tmp_path / "two.log", "two__*", {"epochs": 2, "steps": 200})]
    equal_time.run_children(jobs, 2, where)
    record = json.loads(where.read_text())
    assert set(record) == {"earlier", "one", "bad", "two"}
    assert [record[k]["exit_status"] for k in ("one", "bad", "two")] == [0, 1, 0]
    assert [record[k]["run"] for k in ("one", "bad", "two")] == ["runs/one__1", None, "runs/two__1"]
    assert record["two"]["epochs"] == 2 and record["two"]["steps"] == 200
    assert record["one"]["command"] == \
        "OMP_NUM_THREADS=1 python -c import os; os.makedirs('runs/one__1')"
    assert all(record[k]["cpu_seconds"] >= 0 and record[k]["wall_seconds"] > 0
               for k in ("one", "bad", "two"))
    assert "failed (exit 1): ebm.py: error: why" in capsys.readouterr().err


def test_ebm_precision_and_ood_experiments_run_on_a_trained_run(tiny_images, tmp_path):
    from experiments import ebm_ood, ebm_precision

    run = ebm.main(train_args("ebm", tiny_images, tmp_path, "--epochs", 1))
    ood = ebm_ood.main([str(run), "--limit-test", "16"])
    assert (ood["n_test"] == 16
            and set(ood["ood"]) == set(ebm_ood.ood_sets(torch.rand(2, 3, 32, 32), None)))
    assert all(row["n"] == 16 and 0 <= row["auroc"] <= 1 for row in ood["ood"].values())
    assert json.loads((run / "ood.json").read_text()) == json.loads(json.dumps(ood))
    assert (run / "ood_energies.png").exists()

    def roughness(x):  # an energy that knows smooth images: the mean jump between neighbours
        return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3))
                + (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)))

    # bug it catches: the AUROC of E instead of -E (every row 1 - AUROC). The test images are smooth
    # blobs: every noisy or shuffled image is rougher (AUROC 1), a constant colour smoother (0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ebm, "load_trained", lambda *args: (roughness, None))
        rows = ebm_ood.main([str(run), "--limit-test", "16"])["ood"]
    assert [rows[name]["auroc"] for name in ("uniform noise", "shuffled pixels",
                                             "heavy noise (sigma 0.3)", "constant colour")] == [
        1.0, 1.0, 1.0, 0.0]
    result = ebm_precision.main([str(run), "--n", "8", "--chains", "4", "--steps", "2"])
    assert json.loads((run / "precision.json").read_text()) == json.loads(json.dumps(result))
    moves = result["moves"]["test images"]
    assert moves["n"] == 8 and 0 <= moves["move_abs_diff_mean"] <= 2 * 10 * 0.01
    assert math.isfinite(result["chains"]["final_abs_diff_bf16"])


def test_ncsn_precision_experiment_runs_on_a_trained_run(tiny_images, tmp_path, capsys):
    """experiments/ncsn_precision.py (its table is in experiments/README.md) on a tiny trained run:
    a row of finite numbers for each of its 7 sigmas. Bug it catches: the harness left behind by a
    change in the model file, found only when someone reruns it."""
    from experiments import ncsn_precision

    run = ncsn.main(train_args("ncsn", tiny_images, tmp_path, "--epochs", 1))
    capsys.readouterr()
    ncsn_precision.main([str(run), "--n", "4"])
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| sigma")]
    assert len(rows) == 7 and all(len(row) == 9 for row in rows)
    assert all(math.isfinite(float(cell.strip().rstrip("%"))) for row in rows for cell in row)


def test_vae_precision_experiment_runs_on_a_trained_run(tiny_images, tmp_path):
    """experiments/vae_precision.py (its table is in experiments/README.md) on a tiny trained run:
    finite bits/dim for every arrangement of float32 and bf16. Bug it catches: the harness left
    behind by a change in the model file."""
    from experiments import vae_precision

    run = vae.main(train_args("vae", tiny_images, tmp_path, "--epochs", 1))
    vae_precision.main([str(run), "--n", "4", "--batch-size", "4", "--out",
                        str(tmp_path / "precision.json")])
    result = json.loads((tmp_path / "precision.json").read_text())
    assert result["n_test"] == 4 and len(result["arrangements"]) > 1
    assert all(math.isfinite(a["test_bpd"]) for a in result["arrangements"].values())
    assert (tmp_path / "precision.md").exists()


def test_gpu_check_script_runs_on_the_cpu_at_tiny_size(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu"), "--cpu-smoke",
                           "--out", str(tmp_path)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["check"]: row for row in json.loads((tmp_path / "gpu_check.json").read_text())}
    # header, rule, one line per row
    assert (tmp_path / "gpu_check.md").read_text().count("\n") == len(rows) + 2
    for model in MODELS:
        assert rows[f"{model} bench (eager, default precision)"]["status"] == "ok"
        assert rows[f"{model} bench --no-amp"]["precision"] == "float32"
        assert (rows[f"{model} bench --memory-format channels_last"]["memory_format"]
                == "channels_last")
        assert rows[f"{model}: train 1 epoch, --resume to 2, --sample"]["status"] == "ok"
        assert rows[f"{model} bench --compile"]["status"] == "skipped"  # with its reason
    assert rows["ncsn: NaN every second step, skipped (default precision)"]["adam_steps"] == 2
    assert all(row["status"] in ("ok", "skipped") and (row["status"] == "ok" or row["why"])
               for row in rows.values())


def test_the_lecture_files_keep_their_budgets_and_line_length():
    """The design's budgets (STYLE.md): each model file a lecture read in one sitting. Bugs it
    catches: a line over 100 characters, a function over 60 lines, the run section drifting apart
    between the three files."""
    import ast

    sections = {}
    for name in ("ncsn.py", "vae.py", "ebm.py", "common.py"):
        text = (ROOT / name).read_text()
        assert all(len(line) <= 100 for line in text.splitlines()), name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno + 1 <= 60, (name, node.name)
        if name == "common.py":
            assert len(text.splitlines()) <= 450
            continue
        sections[name] = text[text.index("# The run:"):text.index("\ndef main(")]
        # the lecture's order, and from the network to the end of train() at most 350 lines
        order = ["# The network", "# The loss", "# The sampler", "# Training", "\ndef train(",
                 "# Commands", "# The run:", "\ndef main("]
        starts = [text.index(banner) for banner in order]
        assert starts == sorted(starts), name
        end_of_train = text.index("\n\n\n", starts[4])
        assert text[starts[0]:end_of_train].count("\n") <= 350, name
    # the same text in all three
    assert sections["ncsn.py"] == sections["vae.py"] == sections["ebm.py"]
