"""The test suite: math with known answers, data and metrics, and each script end to end.

    python -m pytest -q

Layout: common.py (data, metrics, grids, its command line); then the contract every model script
keeps, tested on all three with the same test (resume, torchrun, faults, bad input, commands); then
one section per model for its own math and commands. Scripts run on a tiny image folder the tests
write themselves, at tiny widths, so the whole suite stays within minutes on two CPU cores.
"""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import common
import ebm
import ncsn
import vae
from experiments import ebm_chains, ebm_ood, ebm_precision

ROOT = Path(__file__).resolve().parent
REAL_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
MODELS = {"ncsn": ncsn, "vae": vae, "ebm": ebm}
TINY = {  # each script at a size that trains an epoch of 64 images in about a second on one CPU thread
    "ncsn": ["--width", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--num-scales", "10",
             "--steps-per-level", "1", "--batch-size", "16", "--log-every", "2", "--limit-test", "16",
             "--sample-batch", "16"],
    "vae": ["--width", "8", "--blocks", "1", "--latent-channels", "4", "--mixtures", "3", "--batch-size", "16",
            "--log-every", "2"],
    "ebm": ["--width", "8", "--sgld-steps", "3", "--buffer-size", "200", "--batch-size", "16", "--log-every", "2"],
}


def run_script(script, *args, check=True, timeout=300, torchrun=False):
    """Run `python script args` (or a two-process torchrun) as a user would; returns the CompletedProcess."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    proc = subprocess.run([*launcher, str(ROOT / script), *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def train_args(model, data, tmp, *extra):
    """Command-line arguments for a tiny training run of `model` on `data`, writing under tmp."""
    return ["--data", str(data), "--data-root", str(tmp / "data"), "--run-dir", str(tmp / "runs"), "--device", "cpu",
            *TINY[model], *map(str, extra)]


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


# In-process runs use one thread, like the subprocesses (OMP_NUM_THREADS=1): bit-identical results need the same
# thread count (it changes the order of floating-point sums), and on a busy machine two spin-waiting threads per
# process can make a tiny convolution many times slower.
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
    """Register 'tiny-random' with torch-fidelity: a small fixed random conv net as feature extractor.

    It lets the whole FID / IS / KID pipeline run offline (no Inception weights here). Its scores measure
    a real distance between feature statistics but are NOT comparable with any published number.
    """
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class TinyRandomFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            g = torch.Generator().manual_seed(0)
            self.w1 = torch.nn.Parameter(torch.randn(32, 3, 4, 4, generator=g) / 7, requires_grad=False)
            self.w2 = torch.nn.Parameter(torch.randn(64, 32, 4, 4, generator=g) / 23, requires_grad=False)
            self.head = torch.nn.Parameter(torch.randn(10, 64, generator=g) / 8, requires_grad=False)

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
    """Frechet distance between Gaussians fitted to two (N, F) feature sets, by torch-fidelity's own code."""
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
    Image.fromarray(deep).save(tmp_path / "d" / "sixteen_bit.png")  # 16-bit greyscale: rescaled, not clipped
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
    (tmp_path / "imgs" / "cut.jpg").write_bytes(good[: len(good) // 2])  # a truncated JPEG among good ones
    for _ in range(2):  # the second run reads the cache: the warning must still be there
        images = common.load_images(str(tmp_path / "imgs"), str(tmp_path / "root"), "train")
        err = capsys.readouterr().err.strip().splitlines()
        assert len(images) == 5 and len(err) == 1 and "1 unreadable" in err[0] and "cut.jpg" in err[0]
    (tmp_path / "junk").mkdir()
    for i in range(3):
        (tmp_path / "junk" / f"{i}.png").write_bytes(b"not an image")
    with pytest.raises(common.UserError, match="none of the 2 image files .* could be read"):  # (1 of 3: test)
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


def test_device_loader_sees_every_image_once_and_flips_about_half():
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


def test_device_loader_ddp_shards_are_disjoint_and_complete():
    images = torch.arange(600, dtype=torch.int64).view(600, 1, 1, 1).expand(600, 3, 32, 32)
    images = torch.stack([images[:, 0] % 256, images[:, 0] // 256, images[:, 0] * 0], 1).to(torch.uint8)
    seen = []
    for rank in range(3):
        loader = common.DeviceLoader(images, 50, "cpu", seed=0, rank=rank, world_size=3, flip=False)
        x = torch.cat(list(loader.epoch(5)))
        seen.append(set(((x[:, 0, 0, 0] * 255).round() + 256 * (x[:, 1, 0, 0] * 255).round()).long().tolist()))
    assert all(len(s) == 200 for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    assert set.union(*seen) == set(range(600))


def test_toy_data_shapes_and_mixture_weights():
    g = torch.Generator().manual_seed(0)
    x = common.toy_data("mixture", 20000, g)
    assert x.shape == (20000, 2)
    assert abs((x[:, 0] > 0).float().mean().item() - 0.8) < 0.01
    for name in ("8gaussians", "rings"):
        assert common.toy_data(name, 100, g).shape == (100, 2)
    # the exact log density integrates to 1 over a fine grid
    grid = torch.stack(torch.meshgrid(torch.linspace(-12, 12, 481), torch.linspace(-12, 12, 481), indexing="ij"), -1)
    mass = common.mixture_log_prob(grid.reshape(-1, 2)).exp().sum() * (24 / 480) ** 2
    assert abs(mass.item() - 1) < 1e-3


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
    same = common.generative_metrics(train, str(tiny_images), str(tmp_path), extractor="tiny-random")
    shifted = common.generative_metrics((train + 0.3).clamp(0, 1), str(tiny_images), str(tmp_path),
                                        extractor="tiny-random")
    assert same["n_samples"] == 64 and same["n_reference"] == 64 and same["extractor"] == "tiny-random"
    assert abs(same["fid"]) < 1e-6 and shifted["fid"] > 0.01
    assert shifted["kid_mean"] > same["kid_mean"] and same["is_mean"] >= 1.0
    assert list((tmp_path / "fidelity_cache").iterdir())  # reference statistics were cached
    with pytest.raises(common.UserError, match="--fid-extractor no-such-net"):
        common.generative_metrics(train, str(tiny_images), str(tmp_path), extractor="no-such-net")


def test_metrics_without_weights_name_the_flag(tiny_images, tmp_path, monkeypatch):
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached weights
    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", offline)
    with pytest.raises(common.UserError, match="--fid-weights FILE"):
        common.generative_metrics(torch.rand(10, 3, 32, 32), str(tiny_images), str(tmp_path))


def test_linear_probe_separates_separable_classes_and_is_at_chance_on_shuffled_labels():
    """Bugs it catches: a probe scored on its own training set, a bias that never trains, labels and features
    out of step (shuffled rows), the standardisation computed on the test set."""
    g = torch.Generator().manual_seed(0)
    classes, dims = 5, 40
    centres = 4 * torch.randn(classes, dims, generator=g)
    labels = torch.randint(0, classes, (3000,), generator=g)
    features = centres[labels] + torch.randn(3000, dims, generator=g) + 100  # an offset the bias must absorb
    train, test = slice(0, 2000), slice(2000, 3000)
    top1, _ = common.linear_probe(features[train], labels[train], features[test], labels[test], classes)
    assert top1 > 0.99
    noise = torch.randn(3000, dims, generator=g)  # features that say nothing about the labels
    top1, _ = common.linear_probe(noise[train], labels[train], noise[test], labels[test], classes)
    assert abs(top1 - 1 / classes) < 0.05  # chance is 0.2; the standard error at 1,000 test images is 0.013
    shuffled = labels[torch.randperm(3000, generator=g)]  # real features, labels no longer theirs
    top1, _ = common.linear_probe(features[train], shuffled[train], features[test], shuffled[test], classes)
    assert abs(top1 - 1 / classes) < 0.05


def test_to_uint8_clamps_before_converting():
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.7])
    assert common.to_uint8(x).tolist() == [0, 0, 128, 255, 255]


# ------------------------------------------------------------------------------------------------
# common.py: grids, plots, its command line
# ------------------------------------------------------------------------------------------------

def test_grids_and_metric_plots_are_written(tmp_path):
    common.save_grid(torch.rand(10, 3, 32, 32) * 2 - 0.5, tmp_path / "grid.png")
    common.save_rows([("a", torch.rand(4, 3, 32, 32)), ("b", torch.rand(2, 3, 32, 32))], tmp_path / "rows.png")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / (s + 1)}) + "\n"
                                                    for s in range(5)))
    assert [r["step"] for r in common.read_metrics(tmp_path)] == list(range(5))
    path = common.plot_metrics(tmp_path)
    for name in ("grid.png", "rows.png", path.name):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_explore_and_bench_data_commands(tiny_images, tmp_path):
    out = run_script("common.py", "explore", "--data", tiny_images, "--data-root", tmp_path, "--out", tmp_path / "x")
    stats = json.loads((tmp_path / "x" / "stats.json").read_text())
    assert stats["images_per_class"] == {"blobs_a": 32, "blobs_b": 32} and "channel mean" in out.stdout
    for name in ("class_counts.png", "pixel_histograms.png", "examples.png", "mean_image.png"):
        assert (tmp_path / "x" / name).exists()
    bench = run_script("common.py", "bench-data", "--data", tiny_images, "--data-root", tmp_path, "--batch-size", 16)
    assert bench.stdout.strip().splitlines()[-1].startswith("ratio:")
    bad = run_script("common.py", "explore", "--data", tmp_path / "nope", check=False)
    assert bad.returncode != 0 and "no such folder" in bad.stderr and "Traceback" not in bad.stderr


def test_compare_tables_runs_and_shows_missing_metrics_as_missing(tmp_path):
    full = tmp_path / "vae__a__1__20260101-000000"
    (full / "samples").mkdir(parents=True)
    (full / "config.json").write_text(json.dumps({"args": {}}))
    rows = [{"step": 1, "img_per_s": 10.0}, {"step": 2, "img_per_s": 30.0}, {"step": 3, "img_per_s": 20.0},
            {"step": 3, "epoch": 1, "epoch_seconds": 42.0, "test_bpd": 5.5}]
    (full / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (full / "eval.json").write_text(json.dumps({"fid": 12.5, "is_mean": 3.25, "kid_mean": 0.01, "n_samples": 500,
                                                "extractor": "tiny-random", "test_iwae_bpd": 5.25,
                                                "sampling_seconds_per_1000": 2.0, "nfe_per_sample": 1}))
    torch.save({"model": "vae", "net": {"w": torch.zeros(10, 3)}, "epoch": 1}, full / "checkpoint.pt")
    common.save_grid(torch.rand(4, 3, 32, 32), full / "samples" / "epoch_0001.png")
    bare = tmp_path / "ncsn__b__1__20260101-000000"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"args": {}}))
    run_script("common.py", "compare", full, bare, "--out", tmp_path / "out")
    table = (tmp_path / "out" / "compare.md").read_text().splitlines()
    row_full, row_bare = (next(line for line in table if name in line) for name in (full.name, bare.name))
    cells = [c.strip() for c in row_full.strip("|").split("|")]
    assert cells[:8] == ["vae", full.name, "30", "20.0", "42", "1", "5.250", "12.50"]  # median speed, IWAE first
    assert cells[10:] == ["500", "tiny-random", "2.0", "1"]
    assert [c.strip() for c in row_bare.strip("|").split("|")][2:] == ["—"] * 12
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000
    bad = run_script("common.py", "compare", tmp_path / "nothing", check=False)
    assert bad.returncode == 1 and "not a run folder" in bad.stderr


def test_readme_quick_start_is_what_ci_runs_and_what_the_tests_exercise():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert quick_start == ["pip install -r requirements.txt && python ncsn.py --epochs 200", "python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -r requirements.txt" in ci and ci.strip().endswith(quick_start[1])
    args = ncsn.parse_args(["--epochs", "200"])  # the main job: the flag parses to the NCSNv2 recipe, run small below
    assert args.epochs == 200 and args.preset == "ncsnv2" and args.lr == 1e-4 and args.data == "cifar10"
    assert args.num_scales == 232 and args.sigma_max == 50 and args.ema == 0.999 and args.score_param == "divide"
    requirements = (ROOT / "requirements.txt").read_text()
    for package in ("torch", "torchvision", "numpy", "matplotlib", "tqdm", "torch-fidelity", "tensorboard", "pytest"):
        assert f"\n{package}" in "\n" + requirements


@pytest.mark.skipif(not REAL_DATA.exists(), reason="the shared CIFAR-10 JPEG copy is not on this machine")
def test_explore_on_real_cifar10_copy(tmp_path):
    stats = common.explore(str(REAL_DATA), str(ROOT / "data"), tmp_path)
    assert stats["train_images"] == 50000 and stats["test_images"] == 10000
    assert set(stats["images_per_class"].values()) == {5000}
    assert all(0.4 < m < 0.55 for m in stats["channel_mean"])


# ------------------------------------------------------------------------------------------------
# The contract every model script keeps (SPEC.md), tested on all three with the same tests
# ------------------------------------------------------------------------------------------------

def checkpoints_equal(a, b):
    """Every tensor of two checkpoints (weights, EMA, optimiser moments, replay buffer) bit for bit."""
    def tensors(ckpt):
        out = {f"{key}.{name}": t for key in ("net", "ema") if key in ckpt for name, t in ckpt[key].items()}
        out.update({f"optimizer.{i}.{k}": t for i, s in ckpt["optimizer"]["state"].items() for k, t in s.items()})
        return {**out, **({"buffer": ckpt["buffer"]} if "buffer" in ckpt else {})}

    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def epochs_logged(run):
    """(step, epoch) of every row of metrics.jsonl, in order."""
    return [(r["step"], r.get("epoch")) for r in common.read_metrics(run)]


@pytest.fixture(scope="module", params=list(MODELS))
def trained(request, tiny_images, tmp_path_factory):
    """For each model: 2 epochs in one go, and 1 epoch, then --resume to 2 (in-process: main(argv) is the program)."""
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
                 "samples/epoch_0001.png", "samples/epoch_0002.png"):
        assert (full / name).exists(), name
    assert list(full.glob("events.out.tfevents.*")) and not list(full.glob("*.tmp"))
    config = json.loads((full / "config.json").read_text())
    assert config["args"]["epochs"] == 2 and config["torch"] == torch.__version__
    assert full.name.startswith(f"{model}__default__1__")
    ckpt = torch.load(full / "checkpoint.pt", weights_only=True)
    assert ckpt["model"] == model and ckpt["epoch"] == 2 and ckpt["step"] == 8  # 64 images, 16 per step


def test_resume_is_bit_identical_and_logs_each_epoch_once(trained):
    _, _, full, half, _ = trained
    a, b = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (full, half))
    assert a["step"] == b["step"] == 8 and a["epoch"] == b["epoch"] == 2
    assert checkpoints_equal(a, b)
    assert epochs_logged(half) == epochs_logged(full)  # the resumed log reads as if it had never stopped


def test_a_checkpoint_from_the_gpu_resumes_on_the_cpu(trained):
    """On CUDA the networks are channels_last, and so are the optimiser's moments in the checkpoint; the CPU's
    fused Adam assumes a moment is laid out like its weight, so it must be converted on load, not misread."""
    model, module, full, _, tmp = trained
    gpu_like = tmp / "gpu_like"
    shutil.copytree(tmp / "after_one_epoch", gpu_like)
    ckpt = torch.load(gpu_like / "checkpoint.pt", weights_only=True)
    to_cl = lambda t: t.to(memory_format=torch.channels_last) if t.dim() == 4 else t  # noqa: E731
    for key in ("net", "ema"):
        if key in ckpt:
            ckpt[key] = {k: to_cl(t) for k, t in ckpt[key].items()}
    ckpt["optimizer"]["state"] = {i: {k: to_cl(t) for k, t in s.items()} for i, s in ckpt["optimizer"]["state"].items()}
    assert any(not t.is_contiguous() for s in ckpt["optimizer"]["state"].values() for t in s.values())
    torch.save(ckpt, gpu_like / "checkpoint.pt")
    module.main(["--resume", str(gpu_like), "--epochs", "2"])
    assert checkpoints_equal(torch.load(gpu_like / "checkpoint.pt", weights_only=True),
                             torch.load(full / "checkpoint.pt", weights_only=True))


def test_a_crash_before_the_save_leaves_no_trace_after_resume(trained, monkeypatch):
    """A crash after epoch 2 was logged but before its checkpoint was renamed into place (a kill during the
    save leaves checkpoint.pt.tmp): after --resume there is no stray file and every epoch is logged once."""
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
    module.main(["--resume", str(crashed), "--epochs", "2"])
    assert not list(crashed.glob("*.tmp"))
    assert epochs_logged(crashed) == epochs_logged(full)
    assert checkpoints_equal(torch.load(crashed / "checkpoint.pt", weights_only=True),
                             torch.load(full / "checkpoint.pt", weights_only=True))


def test_two_process_torchrun_resume_is_bit_identical(trained, tiny_images, tmp_path):
    """Under torchrun each rank draws its own noise from (seed, rank, epoch), so resume is exact there too."""
    model = trained[0]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(ROOT / f"{model}.py"), *train_args(model, tiny_images, tmp_path / name, "--epochs",
                                                                      epochs)],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, epochs in (("full", 2), ("half", 1))]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert out.count("run folder") == 1  # rank 0 alone prints, logs and saves
    full, half = only_run(tmp_path / "full" / "runs"), only_run(tmp_path / "half" / "runs")
    run_script(f"{model}.py", "--resume", half, "--epochs", 2, torchrun=True)
    a, b = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (full, half))
    assert a["step"] == b["step"] == 8  # 64 images, 8 per rank per step: 4 steps an epoch
    assert checkpoints_equal(a, b)


def fails_cleanly(module, argv, text, capsys):
    """The script's answer to bad input: one line naming the problem (a UserError, which the script prints as
    one line, or argparse's own one line) and a non-zero exit."""
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


def test_bad_inputs_fail_with_one_clear_line_and_leave_runs_intact(trained, tiny_images, tmp_path, capsys):
    model, module, full, _, _ = trained
    run = tmp_path / "run"
    shutil.copytree(full, run)
    before = folder_digest(run)
    broken = {}
    for name, payload in (("cut", (run / "checkpoint.pt").read_bytes()[:1000]), ("random", os.urandom(5000))):
        broken[name] = tmp_path / name
        broken[name].mkdir()
        shutil.copy(run / "config.json", broken[name])
        (broken[name] / "checkpoint.pt").write_bytes(payload)
    broken["code"] = tmp_path / "code"
    shutil.copytree(broken["cut"], broken["code"], dirs_exist_ok=True)
    torch.save({"model": model, "payload": Path("x")}, broken["code"] / "checkpoint.pt")  # a pickle with an object
    broken["other"] = tmp_path / "other"
    shutil.copytree(broken["cut"], broken["other"], dirs_exist_ok=True)
    torch.save({"model": "another"}, broken["other"] / "checkpoint.pt")
    broken["partial"] = tmp_path / "partial"
    shutil.copytree(broken["cut"], broken["partial"], dirs_exist_ok=True)
    torch.save({"model": model, "net": {}}, broken["partial"] / "checkpoint.pt")  # e.g. saved by another tool
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "0.png").write_bytes(b"not an image")
    fresh = lambda *extra: train_args(model, tiny_images, tmp_path, *extra)  # noqa: E731
    width = {"ncsn": 16, "vae": 16, "ebm": 16}[model]
    cases = [
        (fresh("--epochs", 0), "epochs"),
        (fresh("--batch-size", -1), "batch-size"),
        (fresh("--data", tmp_path / "missing"), "no such folder"),
        (fresh("--data", tmp_path / "a_file"), "a file, not a folder"),
        (fresh("--data", tmp_path / "junk"), "could be read"),
        (fresh("--data-root", tmp_path / "a_file"), "--data-root"),
        (fresh("--run-dir", tmp_path / "a_file"), "--run-dir"),
        (["--resume", run, "--epochs", 2], "already has 2 epochs"),
        (["--sample", run, "--width", width], "another width or architecture"),
        (["--sample", tmp_path / "missing"], "not a run folder"),
        (["--sample", broken["cut"]], "corrupt or truncated"),
        (["--sample", broken["random"]], "corrupt or truncated"),
        (["--sample", broken["code"]], "pickled objects other than tensors (refused)"),
        (["--sample", broken["other"]], f"not a checkpoint of {model}.py"),
        (["--sample", broken["partial"]], "is an incomplete checkpoint (it has no args, "),
        (["--resume", broken["partial"], "--epochs", 5], "is an incomplete checkpoint"),
    ] + {"ncsn": [(fresh("--sigma-min", 60), "--sigma-min 60 must be below --sigma-max 50"),
                  (fresh("--ema", 1.5), "--ema must be in [0, 1)")],
         "vae": [(fresh("--ema", 1.5), "--ema must be in [0, 1)")],
         "ebm": [(fresh("--restart-rate", 1.5), "restart-rate")]}[model]
    for argv, text in cases:
        fails_cleanly(module, argv, text, capsys)
    assert folder_digest(run) == before  # nothing in the run was touched
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # no half-made run folder
    proc = run_script(f"{model}.py", "--sample", broken["random"], check=False)  # and as a real process
    assert proc.returncode == 1 and proc.stderr.strip() == f"{model}.py: error: cannot load " \
        f"{broken['random']}/checkpoint.pt: corrupt or truncated", proc.stderr


@pytest.mark.parametrize("model", list(MODELS))
def test_mixed_precision_follows_what_the_gpu_supports(model, monkeypatch):
    """bf16 where the GPU has it natively (compute capability 8+), float16 (with a gradient scaler) on a T4 or
    V100, which would only emulate bf16; float32 on the CPU or with --no-amp."""
    module = MODELS[model]
    args = module.parse_args([])
    cuda = torch.device("cuda")
    for capability, dtype in (((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16),
                              ((7, 0), torch.float16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert module.amp_dtype(args, cuda) == dtype
    assert module.amp_dtype(args, torch.device("cpu")) is None
    assert module.amp_dtype(module.parse_args(["--no-amp"]), cuda) is None
    net, *rest = module.build(module.parse_args(TINY[model]), torch.device("cpu"))
    scaler = rest[-1]
    assert isinstance(scaler, torch.amp.GradScaler) and not scaler.is_enabled()  # float32: no loss scaling


@pytest.mark.parametrize("model", list(MODELS))
def test_bench_times_what_training_runs(model, tmp_path):
    result = MODELS[model].main(["--bench", "--run-dir", str(tmp_path), "--device", "cpu", *TINY[model]])
    saved = json.loads((only_run(tmp_path) / "bench.json").read_text())
    assert saved == json.loads(json.dumps(result)) and saved["precision"] == "float32"  # the CPU: no autocast
    assert saved["train_images_per_s"] > 0 and saved["parameters"] > 0 and saved["projected_hours_200_epochs"] > 0
    assert only_run(tmp_path).name.startswith(f"{model}-bench__")


# ------------------------------------------------------------------------------------------------
# ncsn.py: math with known answers
# ------------------------------------------------------------------------------------------------

def gaussian_score(mu, s2):
    """The exact score of N(mu, s^2 I) convolved with N(0, sigma^2 I): -(x - mu) / (s^2 + sigma^2)."""
    return lambda x, sigma: -(x - mu) / (s2 + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2)


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
        worse = ncsn.dsm_loss(lambda x, s: 1.2 * gaussian_score(mu, s2)(x, s), x, sigmas, levels).mean()
        assert worse > exact + 0.01


def test_ncsn_final_denoising_step_is_the_posterior_mean():
    torch.manual_seed(0)
    mu, s2, sigma = torch.tensor([1.0, -2.0]), 0.7, torch.tensor(0.4)
    y = mu + (s2 + sigma**2) ** 0.5 * torch.randn(1000, 2)  # noisy observations of N(mu, s2 I)
    posterior_mean = mu + s2 / (s2 + sigma**2) * (y - mu)
    assert torch.allclose(ncsn.tweedie_denoise(gaussian_score(mu, s2), y, sigma), posterior_mean, atol=1e-6)


def test_ncsn_annealed_langevin_recovers_mixture_weights_and_plain_langevin_does_not():
    g = torch.Generator().manual_seed(0)
    n = 600
    start = 16 * torch.rand(n, 2, generator=g) - 8
    sigmas = ncsn.geometric_sigmas(20.0, 1.0, 10)
    annealed, _ = ncsn.annealed_langevin(ncsn.exact_mixture_score, start.clone(), sigmas, 100, 0.1,
                                         denoise=False, generator=g)
    plain, _ = ncsn.annealed_langevin(lambda x, s: ncsn.exact_mixture_score(x, 0.0), start.clone(), torch.ones(1),
                                      1000, 0.1, denoise=False, generator=g)
    assert abs(ncsn.share_in_first_mode(annealed) - 0.8) < 0.05
    assert abs(ncsn.share_in_first_mode(plain) - 0.8) > 0.15


TIGHT, WIDE = 0.005, 0.3  # per-dimension data std: below sigma_L (like the directions across the image manifold)


def gaussian_problem(dims=64):
    """N(mu, diag(std^2)), half the dimensions tight, half wide, means spread over [0.2, 0.8] (not the 0.5 of a
    uniform start); its score blurred by sigma is -(x - mu) / (std^2 + sigma^2)."""
    std = torch.cat([torch.full((dims // 2,), TIGHT), torch.full((dims // 2,), WIDE)])
    mu = torch.linspace(0.2, 0.8, dims)
    return mu, std, lambda x, sigma: -(x - mu) / (std**2 + sigma.view(-1, 1) ** 2)


def sample_gaussian(argv, n=2000, seed=0):
    mu, std, score = gaussian_problem()
    settings = ncsn.sampler_settings(ncsn.parse_args(argv), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    x, _ = ncsn.run_sampler(score, torch.rand(n, len(mu), generator=g), settings, generator=g)
    half = len(mu) // 2
    target = (std**2 + settings["sigmas"][-1] ** 2).sqrt()  # p_sigma_L, the distribution the chains approach
    ratio = x.std(0) / target
    return (x.mean(0) - mu).abs().max().item(), ratio[:half].mean().item(), ratio[half:].mean().item(), settings


@pytest.mark.parametrize("sampler, nfe, spread", [("ode", 100, 0.02), ("pc", 464, 0.08)])
def test_ncsn_ode_and_pc_samplers_draw_the_gaussian_with_its_mean_and_spread(sampler, nfe, spread):
    """The probability-flow ODE is exact up to Heun's error, so at 100 evaluations its spread matches to
    sampling noise (measured 1.002 / 1.006); pc (snr 0.16) is biased by its Langevin corrector (1.063 / 1.019
    in the tight / wide directions at 464). Bugs they catch (each injected, each failed): ode: Euler instead
    of Heun (wide 0.958), the slope's sign (NaN); pc: the predictor's noise dropped (wide 0.886), the
    corrector's step not squared (tight 23)."""
    mean_error, tight, wide, settings = sample_gaussian(["--no-denoise", "--sampler", sampler, "--nfe", str(nfe)])
    assert settings["nfe"] in (nfe, nfe - 1)
    assert mean_error < 0.03  # 5 standard errors of the wide directions (0.3 / sqrt(2000))
    assert abs(tight - 1) < spread and abs(wide - 1) < spread, (tight, wide)


def test_ncsn_ncsnv2_sampler_settings_reach_the_spread_technique_4_predicts():
    """Annealed Langevin with NCSNv2's L = 232, T = 5, eps = 6.2e-6 on the exact score of a Gaussian: the tight
    directions end with the spread langevin_variance_ratio predicts for a chain whose excess variance carries
    over from level to level (std 1.062 x the truth), not NCSNv2's formula (1.027, which assumes each level
    starts in equilibrium); technique4_eps gives back the paper's 6.2e-6 from the paper's formula, and with
    the carried-over one a step that shrinks the bias. Bugs it catches (injected, failed): the noise
    sqrt(2 alpha) written sqrt(alpha) (spread 0.75), alpha not scaled by sigma_i^2 / sigma_L^2; and a mean
    not reached (mu is not the uniform start's 0.5)."""
    sigmas = ncsn.geometric_sigmas(50, 0.01, 232)
    gamma = (sigmas[0] / sigmas[1]).item()
    assert ncsn.technique4_eps(sigmas, 5, carried_over=False) == pytest.approx(6.2e-6, rel=0.01)
    predicted = ncsn.langevin_variance_ratio(6.2e-6, 5, gamma, 0.01) ** 0.5
    papers = ncsn.langevin_variance_ratio(6.2e-6, 5, gamma, 0.01, carried_over=False) ** 0.5
    mean_error, tight, wide, settings = sample_gaussian(["--no-denoise"])  # the defaults: NCSNv2's sampler
    assert settings["nfe"] == 1160 and settings["eps"] == 6.2e-6
    assert mean_error < 0.03
    assert tight == pytest.approx(predicted, abs=0.01) and abs(tight - papers) > 0.025, (tight, predicted, papers)
    better = ncsn.technique4_eps(sigmas, 5)
    _, tight_better, _, _ = sample_gaussian(["--no-denoise", "--step-eps", str(better)])
    assert tight_better == pytest.approx(ncsn.langevin_variance_ratio(better, 5, gamma, 0.01) ** 0.5, abs=0.01)
    assert tight_better - 1 < 0.75 * (tight - 1)


def test_ncsn_every_sampler_costs_the_network_evaluations_it_reports():
    """nfe (eval.json's nfe_per_sample, the --nfe knob) counted by a wrapper around the network. Bug it catches
    (injected, failed): a cost formula that counts Heun's two evaluations per step as one."""
    for sampler in ("ald", "pc", "ode"):
        for argv in ([], ["--nfe", "40"], ["--nfe", "41", "--no-denoise"], ["--preset", "ncsn2019"]):
            calls = []

            def counting(x, sigma, calls=calls):
                calls.append(1)
                return -(x - 0.5)

            settings = ncsn.sampler_settings(ncsn.parse_args(["--sampler", sampler, *argv]), torch.device("cpu"))
            ncsn.run_sampler(counting, torch.rand(2, 3), settings)
            assert len(calls) == settings["nfe"], (sampler, argv)
            if "--nfe" in argv:  # as close to the budget as the sampler's unit (ald: T steps; pc, ode: 2) allows
                unit = settings["steps"] if sampler == "ald" else 2
                assert int(argv[1]) - unit < settings["nfe"] <= int(argv[1]), (sampler, argv, settings["nfe"])


@pytest.mark.parametrize("sampler, mean_bound, spread_bound", [("ald", 0.35, 0.15), ("pc", 0.5, 0.25)])
def test_ncsn_inpainting_samples_the_conditional_of_a_correlated_gaussian(sampler, mean_bound, spread_bound):
    """x ~ N(mu, C) on 16 'pixels' with C_ij = 0.1^2 exp(-|i - j| / 4) (neighbours alike, as in images), the
    left 8 observed: the free pixels given the observed y are Gaussian with mean mu_f + C_fo C_oo^-1 (y - mu_o)
    and covariance C_ff - C_fo C_oo^-1 C_of. Conditioning by re-noising the observed pixels (Alg. 2) is
    approximate: at sigma the chains see y + sigma z, whose conditional mean is shrunk towards the marginal, and
    at small sigma the steps are too small to mix, so a bias remains (measured, in conditional standard
    deviations: ald 0.27, pc 0.39; spread 1.05-1.09 and 1.07-1.18). Bug it catches (injected, failed): the
    observed pixels imposed only at the end instead of before every step (mean off by 2.5 std, spread 1.75)."""
    g = torch.Generator().manual_seed(0)
    d, n = 16, 2000
    idx = torch.arange(d, dtype=torch.float64)
    cov = 0.1**2 * torch.exp(-(idx[:, None] - idx[None]).abs() / 4)
    mu = torch.linspace(0.3, 0.7, d, dtype=torch.float64)
    eigvals, eigvecs = torch.linalg.eigh(cov)

    def score(x, sigma):  # -(C + sigma^2 I)^-1 (x - mu), through C's eigenvectors
        inverse = eigvecs / (eigvals + sigma[0].double() ** 2) @ eigvecs.T
        return -((x.double() - mu) @ inverse).float()

    o, f = slice(0, d // 2), slice(d // 2, d)
    y = (mu + torch.linalg.cholesky(cov) @ torch.randn(d, generator=g, dtype=torch.float64)).float()
    gain = cov[f, o] @ torch.linalg.inv(cov[o, o])
    cond_mean = (mu[f] + gain @ (y[o].double() - mu[o])).float()
    cond_std = torch.diagonal(cov[f, f] - gain @ cov[o, f]).sqrt().float()  # 0.063 next to the observed, 0.099
    mask = torch.zeros(n, d, dtype=torch.bool)
    mask[:, o] = True
    settings = ncsn.sampler_settings(ncsn.parse_args(["--sampler", sampler]), torch.device("cpu"))  # NCSNv2's
    x, _ = ncsn.run_sampler(score, torch.rand(n, d, generator=g), settings, y.expand(n, d), mask, generator=g)
    assert torch.equal(x[:, o], y[o].expand(n, d // 2))
    free = x[:, f]
    mean_error = ((free.mean(0) - cond_mean).abs() / cond_std).max().item()  # the marginal mean is 2.5 std away
    spread = free.std(0) / cond_std
    assert mean_error < mean_bound and ((spread - 1).abs() < spread_bound).all(), (mean_error, spread)


def test_ncsn_ema_update_is_a_plain_average_outside_autograd():
    net, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2).requires_grad_(False)
    old = [p.clone() for p in ema.parameters()]
    ncsn.update_ema(ema, net, 0.9, step=10**6)  # long after the warm-up: d = decay
    for e, o, p in zip(ema.parameters(), old, net.parameters()):
        assert torch.allclose(e, 0.9 * o + 0.1 * p) and e.is_leaf and e.grad_fn is None  # no graph kept
    old = [p.clone() for p in ema.parameters()]
    ncsn.update_ema(ema, net, 0.999, step=0)  # the first step: d = 1 / 10
    assert all(torch.allclose(e, 0.1 * o + 0.9 * p) for e, o, p in zip(ema.parameters(), old, net.parameters()))
    ncsn.update_ema(ema, net, 0.0, step=10**6)
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), net.parameters()))  # decay 0: a copy


def test_ncsn_geometric_sigmas_and_score_net_shapes():
    sigmas = ncsn.geometric_sigmas(50, 0.01, 232)
    assert sigmas[0].item() == pytest.approx(50) and sigmas[-1].item() == pytest.approx(0.01)
    ratios = sigmas[1:] / sigmas[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-4)
    default, *_ = ncsn.build(ncsn.parse_args([]), torch.device("cpu"))
    assert 20e6 < sum(p.numel() for p in default.parameters()) < 35e6  # the papers' size (NCSNv2: 29.7M)
    net = ncsn.ScoreNet(8, (1, 2), 1)
    x, sigma = torch.rand(3, 3, 32, 32), torch.tensor([0.01, 1.0, 50.0])
    assert net(x, sigma).shape == (3, 3, 32, 32)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_ncsn_both_score_parameterisations_reach_the_exact_score_from_sigma_1_to_0_01():
    """Data at three flat-colour images x_k: the score of p_sigma is sum_k w_k(x) (x_k - x) / sigma^2, with
    w = softmax_k(-|x - x_k|^2 / 2 sigma^2); its size grows as 1/sigma. A small network trained briefly by DSM on
    sigma = 1, 0.1, 0.01 must reach it at both ends. Bug it catches: an 'embed' network whose last norm is not
    sigma-conditioned (before issue 11: relative error 0.97 at sigma = 0.01, its output stuck at one size)."""
    g = torch.Generator().manual_seed(0)
    points = torch.rand(3, 3, 1, 1, generator=g).expand(3, 3, 8, 8).contiguous()  # (K, 3, 8, 8)
    sigmas = ncsn.geometric_sigmas(1.0, 0.01, 3)

    def exact_score(x, sigma):
        w = torch.softmax(-(x[:, None] - points).pow(2).flatten(2).sum(2) / (2 * sigma**2), dim=1)  # (B, K)
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
            x = points[torch.arange(256) % 3] + sigma * torch.randn(256, 3, 8, 8, generator=g)  # x ~ p_sigma
            with torch.no_grad():
                estimate, truth = net(x, torch.full((256,), sigma)), exact_score(x, sigma)
            relative_error = ((estimate - truth).pow(2).sum() / truth.pow(2).sum()).sqrt().item()
            assert relative_error < 0.4, (mode, sigma, relative_error)  # measured 0.16-0.26; old 'embed': 0.97


def test_ncsn_divide_network_is_unchanged_and_embed_adds_only_the_conditional_norm():
    """Bug it catches: the conditional norm leaking into the default ('divide') path, which must keep its
    architecture and speed; 'embed' differs by one Linear (embedding -> scale and shift) and no affine."""
    divide, embed = ncsn.ScoreNet(8, (1, 2), 1, "divide"), ncsn.ScoreNet(8, (1, 2), 1, "embed")
    assert not any(isinstance(m, ncsn.SigmaGroupNorm) for m in divide.modules())
    assert isinstance(embed.out[0], ncsn.SigmaGroupNorm)
    extra = sum(p.numel() for p in embed.parameters()) - sum(p.numel() for p in divide.parameters())
    emb_dim, channels = 4 * 8, 8
    assert extra == (emb_dim + 1) * 2 * channels - 2 * channels  # the Linear, minus GroupNorm's own affine
    x, sigma = torch.rand(2, 3, 32, 32), torch.tensor([0.01, 50.0])
    assert embed(x, sigma).shape == divide(x, sigma).shape == (2, 3, 32, 32)


def test_ncsn_head_reads_the_input_in_float32_under_bf16_autocast():
    """At sigma = 0.01 bf16's rounding of the input is a fifth of the noise (README, "Precision"). Bug it catches:
    the head's autocast guard removed (the head then sees and returns bfloat16)."""
    net, seen = ncsn.ScoreNet(8, (1, 2), 1), {}
    net.head.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0], h=output))
    x = torch.rand(2, 3, 32, 32)
    net.down[0].conv1.register_forward_hook(lambda module, inputs, output: seen.update(next=output))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        net(x, torch.full((2,), 0.01))
    assert seen["x"].dtype == seen["h"].dtype == torch.float32 and seen["next"].dtype == torch.bfloat16
    assert torch.allclose(seen["x"], (x - 0.5) / (0.01**2 + 0.25) ** 0.5, rtol=0, atol=1e-6)  # the c_in scaling


def test_ncsn_sigma_conditioned_norm_reaches_large_scales_under_float16():
    """The scale exp(a) must reach 1 / sigma_L = 100 and beyond. Bug it catches: a computed in float16 (a T4's
    autocast), whose exp overflows to inf past a = 11.1 and turns the score into NaN."""
    norm = ncsn.SigmaGroupNorm(8, 4)
    torch.nn.init.constant_(norm.scale_shift.bias[:8], 12.0)  # log-scale 12: scale 1.6e5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = norm(torch.randn(2, 8, 4, 4), torch.zeros(2, 4))
    assert torch.isfinite(out).all() and out.abs().max() > 1e5


# ------------------------------------------------------------------------------------------------
# ncsn.py: training and commands
# ------------------------------------------------------------------------------------------------

def test_ncsn_non_finite_steps_leave_the_weights_alone_and_too_many_stop_the_run(tiny_images, tmp_path,
                                                                                 monkeypatch):
    dsm, calls = ncsn.dsm_loss, []

    def every_second_step_diverges(*args, **kwargs):
        calls.append(1)
        return dsm(*args, **kwargs) * (float("nan") if len(calls) % 2 == 0 else 1.0)

    monkeypatch.setattr(ncsn, "dsm_loss", lambda *a, **k: dsm(*a, **k) * float("nan"))  # every step diverges
    argv = train_args("ncsn", tiny_images, tmp_path, "--epochs", 1, "--max-bad-steps", 100)
    run = ncsn.main([*argv, "--name", "a"])
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.manual_seed(1)  # the run's seed: the same initial weights
    initial = ncsn.build(ncsn.parse_args(TINY["ncsn"]), torch.device("cpu"))[0].state_dict()
    assert all(torch.equal(ckpt["net"][k], initial[k]) for k in initial)  # four NaN steps changed nothing
    monkeypatch.setattr(ncsn, "dsm_loss", every_second_step_diverges)
    run = ncsn.main([*argv, "--name", "b", "--limit-test", "1"])
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    adam_steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert adam_steps == {2}  # of 4 steps, the 2 bad ones were skipped: no update, no moment or count change
    monkeypatch.setattr(ncsn, "dsm_loss", lambda *a, **k: dsm(*a, **k) * float("nan"))
    with pytest.raises(common.UserError, match="training diverged.*last good checkpoint"):
        ncsn.main([*argv, "--name", "c", "--max-bad-steps", "2"])


def test_ncsn_toy_experiment_reproduces_the_paper_figure(tmp_path):
    out = run_script("ncsn.py", "--toy", "--run-dir", tmp_path)
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
    ncsn.main(["--inpaint", str(run)])
    assert (run / "inpaint_right_half.png").exists() and (run / "inpaint_centre.png").exists()
    ncsn.main(["--eval", str(run), "--n", "12", "--fid-extractor", "tiny-random"])
    result = json.loads((run / "eval.json").read_text())
    assert result["n_samples"] == 12 and math.isfinite(result["fid"]) and result["nfe_per_sample"] == 11
    assert result["sampler"] == "ald" and "test_dsm" in result
    per_sigma = result["test_dsm_at_sigma"]
    assert list(per_sigma) == ["0.01", "0.03", "0.1", "0.3", "1", "3", "10", "50"]
    assert all(0 < v < 3 * 1536 for v in per_sigma.values())  # near D/2 = 1536 (a zero score) after one epoch
    ncsn.main(["--eval", str(run), "--n", "12", "--fid-extractor", "tiny-random", "--sampler", "pc", "--nfe", "8"])
    result = json.loads((run / "eval.json").read_text())
    assert result["sampler"] == "pc" and result["nfe_per_sample"] == 8 and math.isfinite(result["fid"])
    capsys.readouterr()
    ncsn.main(["--sample", str(run), "--n", "4", "--sampler", "ode", "--nfe", "9"])
    assert "9 network evaluations each" in capsys.readouterr().out
    ncsn.main(["--inpaint", str(run), "--sampler", "pc", "--nfe", "8"])
    with pytest.raises(ncsn.UserError, match="ode cannot inpaint"):
        ncsn.main(["--inpaint", str(run), "--sampler", "ode"])
    with pytest.raises(SystemExit):
        ncsn.main(["--sample", str(run), "--sampler", "pc", "--nfe", "3"])
    assert "--nfe 3 is too few for --sampler pc" in capsys.readouterr().err
    used = ncsn.eval_sigmas(ncsn.parse_args(["--preset", "ncsn2019"]))  # eval.json's sigmas for the 2019 setting
    ladder = ncsn.noise_levels(ncsn.parse_args(["--preset", "ncsn2019"])).tolist()
    assert list(used) == [0.01, 0.03, 0.1, 0.3, 1.0] and all(v in ladder for v in used.values())
    assert used[0.03] == pytest.approx(0.0278, abs=1e-4)  # its nearest level, not a sigma it never saw
    with pytest.raises(SystemExit):  # an 'embed' network is not asked about sigmas between its 10 levels
        ncsn.parse_args(["--preset", "ncsn2019", "--sampler", "ode", "--nfe", "58"])
    assert "needs more noise levels than the 10 this 'embed' network" in capsys.readouterr().err


@pytest.mark.skipif(not REAL_DATA.exists(), reason="the shared CIFAR-10 JPEG copy is not on this machine")
def test_ncsn_learns_real_cifar10(tmp_path):
    args = ["--data", REAL_DATA, "--data-root", ROOT / "data", "--run-dir", tmp_path, "--limit-train", 2048,
            "--width", "16", "--channel-mult", "1,2,2", "--num-res-blocks", "1", "--num-scales", "10",
            "--steps-per-level", "1", "--batch-size", "32", "--limit-test", "200", "--lr", "1e-3", "--ema", "0",
            "--log-every", "16"]
    run_script("ncsn.py", *args, "--epochs", "3", timeout=600)  # 3 x 64 steps
    dsm = [r["test_dsm"] for r in common.read_metrics(only_run(tmp_path)) if "test_dsm" in r]
    assert len(dsm) == 4 and dsm[-1] < 0.8 * dsm[0]  # before training, then after each epoch


# ------------------------------------------------------------------------------------------------
# vae.py: math with known answers
# ------------------------------------------------------------------------------------------------

def pinned_params(m, pinned, generator):
    """Random mixture parameters (1, 10m, 1, 1) whose channel `pinned` is certain to be -1 or +1."""
    params = torch.randn(1, 10 * m, 1, 1, generator=generator, dtype=torch.float64)
    means, log_scales, coeffs = (params[0, m + i * 3 * m:m + (i + 1) * 3 * m].view(3, m) for i in range(3))
    means *= 1.5  # some means beyond [-1, 1]: the open edge bins must catch their mass
    means[0, 0], log_scales[0, 0] = 1.3, -9.0  # past the top edge, smallest scale (clamped to e^-7)
    means[pinned] = 5.0 if pinned == 2 else -5.0
    log_scales[pinned] = -9.0
    coeffs[1:] = 0.0 if pinned == 2 else coeffs[1:]  # a pinned B ignores R and G
    return params


@pytest.mark.parametrize("pinned", [2, 0])
def test_vae_discretized_likelihood_sums_to_one_over_all_256_values_including_edges(pinned):
    """The joint P(R, G, B) with the R -> G -> B coupling sums to 1 over all 256 x 256 x 256 values.

    One channel is made certain (all its mass on value 0 or 255), so the sum over the other two channels'
    256 x 256 values is the whole sum: pinned B checks R and G -> R; pinned R checks G and B -> R, G.
    """
    g = torch.Generator().manual_seed(pinned)
    m = 3
    params = pinned_params(m, pinned, g)
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 256 values on [-1, 1]
    first, second = torch.meshgrid(values, values, indexing="ij")  # (256, 256): one pixel per pair
    fixed = torch.full_like(first, 1.0 if pinned == 2 else -1.0)
    x = torch.stack([first, second, fixed] if pinned == 2 else [fixed, first, second])[None]  # (1, 3, 256, 256)
    probs = vae.discretized_logistic_mixture_logp(x, params.expand(1, -1, 256, 256), m).exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert probs[0, -1].sum() > 0.01 and probs[0, 0].sum() > 1e-4  # the edge rows carry real mass


def test_vae_uniform_decoder_gives_exactly_8_bits_per_dim(monkeypatch):
    net = vae.VAE(width=8, blocks=1, latent_channels=4, mixtures=2)
    torch.nn.init.zeros_(net.encoder[-1].weight)  # q(z|x) = N(0, I) = p(z): KL exactly 0
    torch.nn.init.zeros_(net.encoder[-1].bias)
    uniform = lambda x, params, m: torch.full((len(x), 32, 32), -3 * math.log(256), dtype=torch.float64)  # noqa: E731
    monkeypatch.setattr(vae, "discretized_logistic_mixture_logp", uniform)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    args = vae.parse_args(["--batch-size", "4"])
    result = vae.test_metrics(net, images, args, torch.device("cpu"), None)
    assert result["test_bpd"] == pytest.approx(8.0, abs=1e-12)
    assert result["test_distortion_bpd"] == pytest.approx(8.0, abs=1e-12) and result["test_rate_bpd"] == 0
    assert result["active_units"] == 0  # every posterior mean is 0: no unit is active
    bpd, distortion, rate = vae.elbo_bits_per_dim(torch.tensor([-3072 * math.log(2)]), torch.tensor([[3072 * 0.5]]))
    assert (distortion, rate) == pytest.approx((1.0, 0.5 / math.log(2))) and bpd == pytest.approx(distortion + rate)


def test_vae_analytic_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    z = mu + (0.5 * logvar).exp() * torch.randn(400_000, 6, generator=g, dtype=torch.float64)
    monte_carlo = (vae.log_normal(z, mu, logvar) - vae.log_normal(z, 0 * z, 0 * z)).mean(0)  # E_q[log q - log p]
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
        g = torch.Generator().manual_seed(1)
        iwae_1 = vae.iwae_logp(net, x, 1, g).view(2, n)  # Monte Carlo KL, one z per draw
        iwae_8 = vae.iwae_logp(net, x[::4], 8, g).view(2, n // 4)  # 8 z per draw, a quarter of the draws
    se = ((elbo.var(1) + iwae_1.var(1)) / n).sqrt()
    assert ((elbo.mean(1) - iwae_1.mean(1)).abs() < 4 * se).all()
    assert (iwae_8.mean(1) > elbo.mean(1)).all()  # a tighter bound on log p(x)


def test_vae_free_bits_stop_the_gradient_of_a_small_kl_only():
    kl = torch.tensor([[0.5, 5.0], [1.5, 7.0]], requires_grad=True)  # (B, C): channel 0 averages 1.0 nats
    loss = vae.training_loss(torch.zeros(2), kl, beta=1.0, free_nats=2.0)
    loss.backward()
    assert loss.item() == pytest.approx((2.0 + 6.0) / 3072)  # max(2, 1) + max(2, 6)
    assert kl.grad[:, 0].abs().sum() == 0 and (kl.grad[:, 1] > 0).all()


def test_vae_iwae_bound_is_exactly_log_px_when_every_importance_weight_is_equal(monkeypatch):
    """Replaces the constant-checking role of test_vae_iwae_bound_k1_is_the_elbo_in_expectation_and_k8_is_...,
    which passes with a missing or wrong `- log K`. Here q(z|x) = p(z) and the decoder ignores z, so every
    weight p(x|z_k) p(z_k) / q(z_k|x) equals p(x) and L_K = log p(x) exactly for every K; p(x) is computed
    independently from the logistic CDF. Bug it catches: a missing `- math.log(k)` (off by log K), or a wrong
    constant such as log(chunk) (K = 30 spans two chunks of 25)."""
    m, g = 1, torch.Generator().manual_seed(0)
    net = vae.VAE(width=8, blocks=1, latent_channels=4, mixtures=m)
    params = torch.rand(1, 10, 32, 32, generator=g) * 2 - 1  # logits, 3 means, 3 log-scales, 3 coefficients
    params[:, 4:7] = params[:, 4:7] / 2 - 0.5  # log-scales in [-1, 0]: every bin's mass is far from underflow
    params[:, 7:] = 0.0  # no R -> G -> B coupling: three independent logistics per pixel
    monkeypatch.setattr(net, "encode", lambda x: (torch.zeros(len(x), 4, 8, 8), torch.zeros(len(x), 4, 8, 8)))
    monkeypatch.setattr(net, "decode", lambda z: params.expand(len(z), -1, -1, -1))
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=g).float() / 127.5 - 1  # edge values 0 and 255 included
    mean, inv_s = params[:, 1:4].double(), torch.exp(-params[:, 4:7].double())  # (1, 3, 32, 32)
    xd = x.double()
    upper = torch.where(xd > 0.999, 1.0, torch.sigmoid(inv_s * (xd + 1 / 255 - mean)))
    lower = torch.where(xd < -0.999, 0.0, torch.sigmoid(inv_s * (xd - 1 / 255 - mean)))
    log_px = (upper - lower).log().sum((1, 2, 3))  # (3,) exact, in float64
    for k in (1, 7, 30):
        iwae = vae.iwae_logp(net, x, k, torch.Generator().manual_seed(k))
        assert torch.allclose(iwae.double(), log_px, rtol=0, atol=0.05), (k, iwae - log_px)  # log 7 = 1.95


def test_vae_decoder_samples_follow_the_discretized_likelihood():
    """Samples of p(x|z) (what FID now scores) have the frequencies Eq. (3) assigns. Bugs it catches: the
    logistic's inverse CDF with the wrong sign or scale, the component drawn from the wrong logits, the edge
    bins closed, the G-on-R coupling applied to the mean instead of the drawn R."""
    m, n = 3, 40_000
    g = torch.Generator().manual_seed(0)
    params = torch.randn(1, 10 * m, 1, 1, generator=g)
    means, log_scales, coeffs = (params[0, m + i * 3 * m:m + (i + 1) * 3 * m].view(3, m) for i in range(3))
    means[0] = torch.tensor([-0.95, 0.2, 0.9])  # R: mass in the bottom edge bin, the middle and near the top
    log_scales[0] = torch.tensor([-2.5, -3.0, -4.0])
    means[1:], log_scales[1:] = -5.0, -9.0  # G and B certain (value 0) whatever R is: P(R, G, B) = P(R)
    coeffs[:] = 0.3
    torch.manual_seed(1)
    x = vae.sample_mixture(params.expand(n, -1, 1, 1), m)  # (n, 3, 1, 1)
    assert (x[:, 1:] == -1).all() and torch.equal(x, ((x + 1) * 127.5).round() / 127.5 - 1)  # on the 256 values
    counts = torch.bincount(((x[:, 0, 0, 0] + 1) * 127.5).round().long(), minlength=256).double()
    values = torch.arange(256.0) / 127.5 - 1
    grid = torch.stack([values, -torch.ones(256), -torch.ones(256)]).view(1, 3, 1, 256)
    p = vae.discretized_logistic_mixture_logp(grid, params.expand(1, -1, 1, 256), m).exp().double().view(256)
    assert p.sum() == pytest.approx(1.0, abs=1e-4) and counts[0] > 1000  # the open bottom bin is well used
    z = (counts / n - p) / (p * (1 - p) / n).sqrt().clamp(min=1e-3)
    assert z.abs().max() < 5, z.abs().max()
    # coupling: a near-certain G sits at mean_G + alpha R, with R the value drawn (one component)
    params = torch.tensor([0.0, 0.0, 0.1, -5.0, -1.0, -9.0, -9.0, math.atanh(0.5), 0.0, 0.0]).view(1, 10, 1, 1)
    # logit; means R, G, B; log-scales (R wide, G and B certain); alpha = tanh(atanh 0.5): G = 0.1 + 0.5 R
    x = vae.sample_mixture(params.expand(2000, -1, 1, 1), 1)
    assert x[:, 0].std() > 0.3 and (x[:, 1] - (0.1 + 0.5 * x[:, 0])).abs().max() < 0.02  # a bin, and s = e^-7


def test_vae_kl_weight_zero_leaves_no_kl_gradient_and_warm_up_scales_to_the_kl_weight():
    """beta = --kl-weight x warm-up ramp; beta = 0 drops the KL from the loss, and the step's gradient is the
    reconstruction term's alone. Bugs it catches: a warm-up that ramps to 1 whatever --kl-weight says (the
    ramp used to be hard-wired to 1), free bits adding a KL term at beta = 0, and 0 * KL turning into NaN
    once an unpenalised KL overflows."""
    args = vae.parse_args(["--preset", "aasae"])
    assert (args.kl_weight, args.augment, args.kl_warmup, args.free_bits) == (0.0, True, 0.0, 0.0)
    assert all(vae.beta_at(step, 10, args) == 0 for step in range(50))
    args = vae.parse_args(["--preset", "aasae", "--kl-warmup", "2", "--free-bits", "0.5"])
    assert all(vae.beta_at(step, 10, args) == 0 for step in range(50))  # even with a warm-up and free bits
    for weight in (1.0, 0.25):
        args = vae.parse_args(["--kl-weight", str(weight), "--kl-warmup", "2"])
        assert vae.beta_at(9, 10, args) == pytest.approx(weight / 2) and vae.beta_at(19, 10, args) == weight
        assert vae.beta_at(500, 10, args) == weight
    kl = torch.tensor([[0.5, float("inf")], [1.5, 7.0]], requires_grad=True)  # an overflowed KL
    log_px_z = torch.tensor([-3000.0, -2000.0], requires_grad=True)
    loss = vae.training_loss(log_px_z, kl, beta=0.0, free_nats=2.0)
    loss.backward()
    assert loss.item() == pytest.approx(2500 / 3072) and (kl.grad is None or not kl.grad.any())
    # one real training step at beta = 0: its gradient is that of the reconstruction term alone
    args = vae.parse_args(["--width", "8", "--blocks", "1", "--latent-channels", "4", "--mixtures", "2", "--preset",
                           "aasae", "--free-bits", "0.5"])
    torch.manual_seed(0)
    net, _, optimizer, scaler = vae.build(args, torch.device("cpu"))
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(1)
    vae.train_step(net, net, optimizer, scaler, x, 0.0, args, {}, None)
    ours = [p.grad.clone() for p in net.parameters()]
    torch.manual_seed(0)
    net, *_ = vae.build(args, torch.device("cpu"))
    torch.manual_seed(1)  # the same view and the same eps
    view = vae.augment(x) * 2 - 1
    log_px_z, _ = net(x * 2 - 1, view)
    (-log_px_z.mean() / 3072).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
    assert all(torch.allclose(a, p.grad, rtol=1e-5, atol=1e-8) for a, p in zip(ours, net.parameters()))


# ------------------------------------------------------------------------------------------------
# vae.py: training and commands
# ------------------------------------------------------------------------------------------------

def test_vae_updates_with_non_finite_or_outlying_gradients_are_skipped():
    torch.manual_seed(0)
    args = vae.parse_args([*TINY["vae"], "--free-bits", "0", "--device", "cpu"])
    net, _, optimizer, scaler = vae.build(args, torch.device("cpu"))
    x, state = torch.rand(4, 3, 32, 32), {}
    step = lambda batch: vae.train_step(net, net, optimizer, scaler, batch, 1.0, args, state, None)  # noqa: E731
    before = [p.detach().clone() for p in net.parameters()]
    *_, bad = step(x.clone().fill_(float("nan")))
    assert bad and all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # a NaN batch: no update
    *_, norm, bad = step(x)
    assert not bad and state["grad_norm_avg"] == norm  # the first finite step sets the running average
    state["grad_norm_avg"] = norm / 100  # the next gradient looks 100x above normal
    before = [p.detach().clone() for p in net.parameters()]
    *_, bad = step(x)
    assert bad and all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.parametrize("trained", ["vae"], indirect=True)
def test_vae_logs_bits_per_dim_and_writes_previews(trained):
    _, _, full, _, _ = trained
    for name in ("samples/epoch_0002_t0.7.png", "reconstructions/epoch_0002.png"):
        assert (full / name).exists(), name
    epochs = [r for r in common.read_metrics(full) if "test_bpd" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]  # epoch 0: the model at initialisation
    for r in epochs:
        assert r["test_bpd"] == pytest.approx(r["test_distortion_bpd"] + r["test_rate_bpd"])
        assert 0 < r["test_bpd"] < 12 and 0 <= r["active_units"] <= r["latent_dims"] == 4 * 8 * 8
    assert any("train_bpd" in r and "grad_norm" in r for r in common.read_metrics(full))
    summary = json.loads((full / "summary.json").read_text())
    assert summary["epochs"] == 2 and "final_test_bpd_without_ema" in summary


def test_vae_sample_interpolate_and_eval(tiny_images, tmp_path, capsys):
    run = vae.main(train_args("vae", tiny_images, tmp_path, "--epochs", 1))
    vae.main(["--sample", str(run), "--n", "16", "--temperature", "0.7"])
    samples = np.load(run / "samples_t0.7.npz")["samples"]
    assert samples.shape == (16, 32, 32, 3) and samples.dtype == np.uint8 and (run / "samples_t0.7.png").exists()
    vae.main(["--interpolate", str(run)])
    assert (run / "interpolations.png").read_bytes()[:4] == b"\x89PNG"
    vae.main(["--eval", str(run), "--n", "16", "--iw-samples", "4", "--fid-extractor", "tiny-random"])
    result = json.loads((run / "eval.json").read_text())
    assert result["n_samples"] == 16 and result["n_test"] == 16 and result["iw_samples"] == 4
    assert result["test_iwae_bpd"] <= result["test_bpd"] + 0.01 and math.isfinite(result["fid"])
    assert "IWAE" in capsys.readouterr().out


def test_vae_aasae_encoder_sees_the_view_and_the_likelihood_scores_the_original(monkeypatch):
    """Eq. (6): q(z|t(x)) and p(x|z). Bugs it catches: the encoder given x instead of the view (the step would
    silently train a plain autoencoder), the likelihood scored on the view."""
    args = vae.parse_args(["--width", "8", "--blocks", "1", "--latent-channels", "4", "--mixtures", "2", "--preset",
                           "aasae"])
    net, _, optimizer, scaler = vae.build(args, torch.device("cpu"))
    seen = {}

    def spy(name, fn):  # fn, recording its first argument
        def recorded(x, *rest):
            seen[name] = x
            return fn(x, *rest)
        return recorded

    monkeypatch.setattr(net, "encode", spy("encoder", net.encode))
    monkeypatch.setattr(vae, "discretized_logistic_mixture_logp", spy("scored", vae.discretized_logistic_mixture_logp))
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(0)
    vae.train_step(net, net, optimizer, scaler, x, 0.0, args, {}, None)
    torch.manual_seed(0)
    assert torch.equal(seen["encoder"], vae.augment(x) * 2 - 1) and torch.equal(seen["scored"], x * 2 - 1)


def test_vae_augmentations_keep_shape_range_and_device_and_match_torchvision(monkeypatch):
    """The batched views equal torchvision's per-image functions (the AASAE code applies those through PIL).
    Bugs it catches: contrast blended with each channel's own mean (torchvision uses the grayscale mean),
    the hue formula off by a sector, a crop box outside [-1, 1], a flip that does not mirror, and any tensor
    made on the CPU (the meta device runs every op without data and refuses a mix of devices)."""
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g)
    x[0] = x[0, :1]  # a grey image: no hue
    brightness, contrast, saturation = (0.4 + 1.2 * torch.rand(6, generator=g) for _ in range(3))
    hue = 0.5 * (2 * torch.rand(6, generator=g) - 1)
    ours = vae.colour_jitter(x, brightness, contrast, saturation, hue)
    theirs = torch.stack([TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(
        x[i], brightness[i].item()), contrast[i].item()), saturation[i].item()), hue[i].item()) for i in range(6)])
    assert torch.allclose(ours, theirs, atol=1e-5)
    one, zero = torch.ones(6), torch.zeros(6)
    assert torch.allclose(vae.resized_crop(x, one, one, zero, zero, one), x, atol=1e-6)  # the whole image
    assert torch.allclose(vae.resized_crop(x, one, one, zero, zero, -one), x.flip(3), atol=1e-6)
    quarter = vae.resized_crop(x, one / 2, one / 2, zero + 0.5, zero - 0.5, one)  # the top-right quarter, 2x
    resized = F.interpolate(x[..., :16, 16:], size=32, mode="bilinear", align_corners=False)
    assert torch.allclose(quarter[..., 1:-1, 1:-1], resized[..., 1:-1, 1:-1], atol=1e-5)  # (borders: see below)
    torch.manual_seed(0)
    views = vae.augment(x.repeat(50, 1, 1, 1))
    assert views.shape == (300, 3, 32, 32) and views.dtype == torch.float32
    assert views.min() >= 0 and views.max() <= 1 and not torch.equal(views, x.repeat(50, 1, 1, 1))
    gray = (views[:, 0] == views[:, 1]).flatten(1).all(1) & (views[:, 1] == views[:, 2]).flatten(1).all(1)
    assert 0.1 < gray.view(50, 6)[:, 1:].float().mean() < 0.3  # p = 0.2 (image 0 of each copy is grey already)
    meta = vae.augment(torch.empty(4, 3, 32, 32, device="meta"))
    assert meta.device.type == "meta" and meta.shape == (4, 3, 32, 32)
    boxes = []  # the crop boxes augment draws: inside the image, RandomResizedCrop's area and aspect ratio
    monkeypatch.setattr(vae, "resized_crop", lambda x, *box: boxes.append(box) or x)
    vae.augment(torch.rand(4000, 3, 32, 32))
    width, height, centre_x, centre_y, flip = boxes[0]
    assert ((centre_x.abs() + width <= 1 + 1e-6) & (centre_y.abs() + height <= 1 + 1e-6)).all()
    assert (width * height >= 0.08 - 1e-6).all() and (width * height <= 1 + 1e-6).all()
    free = (width < 1) & (height < 1)  # boxes that needed no shrinking keep their drawn aspect ratio
    assert ((width / height)[free] >= 3 / 4 - 1e-6).all() and ((width / height)[free] <= 4 / 3 + 1e-6).all()
    assert centre_x.std() > 0.2 and centre_y.std() > 0.2 and abs((flip == -1).float().mean() - 0.5) < 0.05


def test_vae_aasae_preset_trains_resumes_evaluates_and_probes_without_claiming_bits_per_dim(
        tiny_images, tmp_path, capsys):  # noqa: F811
    """--preset aasae end to end: exact resume with the random views, no bits/dim anywhere (train log, test
    rows, summary, eval) but a stated reason, the probe's three rows, and a clear error without labels."""
    full = vae.main(train_args("vae", tiny_images, tmp_path / "a", "--preset", "aasae", "--epochs", 2))
    half = vae.main(train_args("vae", tiny_images, tmp_path / "b", "--preset", "aasae", "--epochs", 1))
    vae.main(["--resume", str(half), "--epochs", "2"])
    assert checkpoints_equal(*(torch.load(r / "checkpoint.pt", weights_only=True) for r in (full, half)))
    rows = common.read_metrics(full)
    assert any("train_distortion_bpd" in r for r in rows) and any("test_distortion_bpd" in r for r in rows)
    assert not any("train_bpd" in r or "test_bpd" in r for r in rows)
    summary = json.loads((full / "summary.json").read_text())
    assert "kl-weight 0" in summary["bits_per_dim"] and not {"final_test_bpd", "final_test_bpd_without_ema"} & set(
        summary)
    assert "no bits/dim" in capsys.readouterr().out
    vae.main(["--eval", str(full), "--n", "16", "--iw-samples", "2", "--fid-extractor", "tiny-random"])
    result = json.loads((full / "eval.json").read_text())
    assert "test_bpd" not in result and "test_iwae_bpd" not in result and "kl-weight 0" in result["bits_per_dim"]
    assert math.isfinite(result["fid"]) and math.isfinite(result["means_fid"])  # samples of p(x|z), and means
    probe = vae.main(["--probe", str(full)])
    saved = json.loads((full / "probe.json").read_text())
    assert saved == json.loads(json.dumps(probe)) and saved["n_train"] == 64 and saved["n_test"] == 16
    assert saved["classes"] == ["blobs_a", "blobs_b"] and saved["chance"] == 0.5
    for name, dims in (("trained_encoder", 4 * 8 * 8), ("random_encoder", 4 * 8 * 8), ("raw_pixels", 3072)):
        assert saved[name]["features"] == dims and 0 <= saved[name]["top1"] <= 1
    flat = tmp_path / "flat"
    write_images(flat, 40)
    shutil.copy(full / "config.json", tmp_path / "config.json")
    fails_cleanly(vae, ["--probe", full, "--data", flat, "--data-root", tmp_path / "data"], "--probe needs labels",
                  capsys)


@pytest.mark.skipif(not REAL_DATA.exists(), reason="the shared CIFAR-10 JPEG copy is not on this machine")
def test_vae_real_cifar10_copy_bits_per_dim_fall_below_init_and_8(tmp_path):
    run_script("vae.py", "--data", REAL_DATA, "--data-root", ROOT / "data", "--run-dir", tmp_path, *TINY["vae"],
               "--limit-train", 1024, "--limit-test", 256, "--batch-size", 32, "--epochs", 1, "--lr", 2e-3,
               "--warmup-steps", 5, "--kl-warmup", 0)
    at_init, final = (r["test_bpd"] for r in common.read_metrics(only_run(tmp_path)) if "test_bpd" in r)
    assert final < at_init and final < 8


# ------------------------------------------------------------------------------------------------
# ebm.py: math with known answers
# ------------------------------------------------------------------------------------------------

def test_ebm_sgld_in_langevin_proportion_samples_the_gaussian_of_a_quadratic_energy():
    torch.manual_seed(0)
    mu, s = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5

    def energy(x):  # E(x) = ||x - mu||^2 / (2 s^2): exp(-E) is N(mu, s^2 I)
        return ((x - mu) ** 2).sum(1) / (2 * s**2)

    eps = 0.02 * s**2  # small against s^2: the discretisation inflates the variance by only 1 / (1 - eps / 4s^2)
    x0 = 3 * torch.randn(10000, 2, dtype=torch.float64)
    x, _, _ = ebm.sgld(energy, x0, 1000, eps / 2, math.sqrt(eps), grad_clip=None, bounds=None)
    assert torch.allclose(x.mean(0), mu, atol=0.02)
    assert torch.allclose(x.var(0), torch.full((2,), s**2, dtype=torch.float64), rtol=0.05)


def test_ebm_replay_buffer_size_restarts_and_range():
    torch.manual_seed(0)
    buffer = ebm.ReplayBuffer(500, (3, 32, 32), "cpu", restart_rate=0.05)
    assert buffer.samples.shape == (500, 3, 32, 32) and 0 <= buffer.samples.min() and buffer.samples.max() <= 1
    buffer.samples.fill_(0.5)  # a marker: anything else in a sampled row is a restart from U(0, 1)
    restarted = 0
    for _ in range(20):
        x, idx = buffer.sample(500)
        assert x.shape == (500, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
        restarted += int((x != 0.5).flatten(1).any(1).sum())
        buffer.push(x.clamp(0, 1) * 0 + 0.5, idx)
    n = 20 * 500  # binomial(10000, 0.05): std 22, so +-5 std is 0.039 ... 0.061
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


def test_ebm_toy_energy_is_lower_at_the_modes_than_between_them():
    net, buffer = ebm.train_toy("8gaussians", iterations=1000, seed=0)
    angle = torch.arange(8) * math.pi / 4
    modes = 2 * torch.stack([angle.cos(), angle.sin()], 1)  # the 8 centres, on the circle of radius 2
    between = 2 * torch.stack([(angle + math.pi / 8).cos(), (angle + math.pi / 8).sin()], 1)  # between k and k + 1
    with torch.no_grad():
        e_modes, e_between, e_centre = net(modes), net(between), net(torch.zeros(1, 2))
    # every mode is a local minimum along the circle (CD learns shapes; the modes' relative masses it learns
    # poorly, because persistent chains seldom cross between modes), and the centre of the ring is high
    assert (e_modes < e_between).all() and (e_modes < e_between.roll(1)).all()
    assert (e_modes < e_centre).all()
    assert buffer.samples.abs().max() <= ebm.TOY["box"]


# ------------------------------------------------------------------------------------------------
# ebm.py: training and commands
# ------------------------------------------------------------------------------------------------

def inject_divergence_at(monkeypatch, at, length):
    """Make training steps at, at + 1, ... report non-finite energies, as a real divergence would."""
    train_step, calls = ebm.train_step, []

    def diverging_train_step(*args, **kwargs):
        calls.append(1)
        stats, bad = train_step(*args, **kwargs)
        return (stats * float("nan"), torch.ones_like(bad)) if at <= len(calls) < at + length else (stats, bad)

    monkeypatch.setattr(ebm, "train_step", diverging_train_step)


def test_ebm_divergence_rolls_back_to_the_last_good_checkpoint_with_a_lower_lr(tiny_images, tmp_path, capsys,
                                                                               monkeypatch):
    inject_divergence_at(monkeypatch, 6, 2)  # steps 6 and 7 of 8: two bad steps in a row
    argv = train_args("ebm", tiny_images, tmp_path, "--epochs", 2, "--log-every", 1, "--max-bad-steps", 2)
    run = ebm.main(argv)
    rows = common.read_metrics(run)
    rollback = [r for r in rows if "rollback" in r]
    lowered = pytest.approx(0.5 * ebm.parse_args([]).lr)
    assert len(rollback) == 1 and rollback[0]["lr"] == lowered and rollback[0]["step"] == 7
    assert "rolled back" in capsys.readouterr().err
    assert rows[-1]["step"] == 8 and rows[-1]["lr"] == lowered  # the run continued to the end
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["rollbacks"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["net"].values()) and torch.isfinite(ckpt["buffer"]).all()
    assert json.loads((run / "summary.json").read_text())["rollbacks"] == 1
    inject_divergence_at(monkeypatch, 2, 100)  # (wraps the wrapper above, which has no injection left)
    with pytest.raises(common.UserError, match="diverged.*last good checkpoint"):
        ebm.main([*argv, "--name", "again", "--max-rollbacks", "0"])


def test_ebm_sample_inpaint_eval_and_ood(tiny_images, tmp_path, monkeypatch):
    run = ebm.main(train_args("ebm", tiny_images, tmp_path, "--epochs", 1))
    for name in ("samples/buffer_0001.png", "samples/chain_0001.png"):
        assert (run / name).exists()
    last_row = common.read_metrics(run)[-1]
    assert {"energy_pos", "energy_neg", "gap", "sgld_grad_norm", "lr", "test_energy"} <= set(last_row)
    ebm.main(["--sample", str(run), "--n", "12", "--steps", "2"])
    samples = np.load(run / "samples.npz")["samples"]
    assert samples.shape == (12, 32, 32, 3) and samples.dtype == np.uint8 and (run / "samples.png").exists()
    ebm.main(["--inpaint", str(run), "--n", "4", "--steps", "2"])
    assert (run / "inpaint.png").read_bytes()[:4] == b"\x89PNG"
    result = ebm.main(["--eval", str(run), "--n", "16", "--steps", "2", "--fid-extractor", "tiny-random"])
    assert result == json.loads((run / "eval.json").read_text()) and result["n_samples"] == 16
    assert math.isfinite(result["fid"]) and result["n_test"] == 16
    assert set(result["ood_auroc"]) == {"uniform noise", "constant colour", "heavy noise (sigma 0.3)",
                                        "shuffled pixels", "average of two test images (IGEBM)",
                                        "gaussian noise 0.5 + 0.5 N(0, 1) (IGEBM)"}
    assert all(0 <= v <= 1 for v in result["ood_auroc"].values()) and (run / "eval_energies.png").exists()

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.SVHN", offline)
    (run / "eval.json").unlink()
    with pytest.raises(common.UserError, match="--ood svhn: SVHN is not in .* put test_32x32.mat"):
        ebm.main(["--eval", str(run), "--ood", "svhn", "--fid-extractor", "tiny-random"])
    assert not (run / "eval.json").exists()


def test_ebm_toy_command_writes_its_figure(tmp_path, monkeypatch):
    monkeypatch.setitem(ebm.TOY, "iterations", 30)
    ebm.main(["--toy", "rings", "--run-dir", str(tmp_path)])
    run = only_run(tmp_path)
    assert (run / "toy.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "toy.json").read_text())["data"] == "rings"


def official_parameter_count(w):
    """IGEBM's ResNet32Large (models.py, utils.py of openai/ebm_code_release) counted from its layout, not from
    our code: stem 3x3 conv without bias; per block conv1 (3x3) + its input bias, conv2 (3x3) + input bias +
    output gain, a 3x3 shortcut conv where the channels change; fc 4w -> 1. Our conv1 bias is per output
    channel instead of per input channel, which adds c_out - c_in where the channels change."""
    blocks = [(w, w)] * 3 + [(w, 2 * w)] + [(2 * w, 2 * w)] * 2 + [(2 * w, 4 * w)] + [(4 * w, 4 * w)] * 2
    total = 9 * 3 * w + 4 * w + 1
    for c_in, c_out in blocks:
        total += 9 * c_in * c_out + c_in + 9 * c_out * c_out + 2 * c_out + (9 * c_in * c_out if c_in != c_out else 0)
    return total, sum(c_out - c_in for c_in, c_out in blocks)


def test_ebm_default_network_is_igebms_unconditional_resnet32large():
    # bugs this catches: the conditional ResNet32 (6 blocks, 2 widths), a missing block, downsampling in the wrong
    # block, a 1x1 shortcut, spectral norm on the final linear layer, a conv left without spectral norm
    net = ebm.EnergyNet(8)
    blocks = list(net.blocks)
    assert len(blocks) == 9
    assert [b.conv1.out_channels for b in blocks] == [8] * 3 + [16] * 3 + [32] * 3
    sizes, x = [], torch.rand(2, 3, 32, 32)
    hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for b in blocks]
    assert net.eval()(x).shape == (2,)
    assert sizes == [16, 16, 16, 8, 8, 8, 4, 4, 4]  # the first block of each width halves the resolution
    [h.remove() for h in hooks]
    shortcuts = [i for i, b in enumerate(blocks) if isinstance(b.skip, torch.nn.Conv2d)]
    assert shortcuts == [3, 6] and all(blocks[i].skip.kernel_size == (3, 3) for i in shortcuts)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 2 * 9 + 2 and all(parametrize.is_parametrized(c, "weight") for c in convs)
    assert not parametrize.is_parametrized(net.head) and net.head.in_features == 32
    # the size: 18.6M at width 128, and 384 more than IGEBM's own count (our conv1 bias, see above)
    official, extra = official_parameter_count(128)
    assert official == 18_591_105 and extra == 384
    assert sum(p.numel() for p in ebm.EnergyNet(128).parameters()) == official + extra
    assert sum(p.numel() for p in net.parameters()) == sum(official_parameter_count(8))


def test_ebm_blocks_start_as_the_identity_because_conv2_is_zero_and_only_bounded():
    # bug this catches: conv2 spectral-normalised as W / sigma (plain SN), which blows its 1e-10 initial weights up
    # to norm 1; or conv2 not zero-initialised. Either way a block would no longer start as silu(x).
    torch.manual_seed(0)
    net = ebm.EnergyNet(8).eval()
    for block in net.blocks:
        assert block.conv2.weight.abs().max() < 1e-6
    block, x = net.blocks[1], torch.randn(4, 8, 16, 16)  # an identity-shortcut block, no pooling
    assert torch.allclose(block(x), torch.nn.functional.silu(x), atol=1e-5)


def test_ebm_spectral_norm_divides_by_the_largest_singular_value():
    # bugs this catches: dividing by sigma^2 or by the Frobenius norm, a power iteration that does not converge
    # (u and v swapped), the bounded variant scaling small weights up
    torch.manual_seed(0)
    conv = ebm.spectral_norm(torch.nn.Conv2d(16, 32, 3))
    for _ in range(200):  # power iterations in training mode (slow to converge on a random matrix)
        weight = conv.weight
    assert torch.linalg.matrix_norm(weight.detach().flatten(1), 2).item() == pytest.approx(1, abs=3e-3)
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
    assert torch.linalg.matrix_norm(weight.detach().flatten(1), 2).item() == pytest.approx(1, abs=3e-3)
    # eval mode: no power iteration, so measuring does not change the model
    u = big.parametrizations.weight[0].u.clone()
    _ = big.eval().weight
    assert torch.equal(big.parametrizations.weight[0].u, u)


def test_ebm_sgld_computes_the_normalised_weights_once_per_chain():
    # bug this catches: SGLD recomputing every spectral norm (and its power iteration) at every one of its K steps
    net = ebm.EnergyNet(4).requires_grad_(False)
    calls = []
    for module in net.modules():
        if isinstance(module, ebm.SpectralNorm):
            module.register_forward_hook(lambda *a: calls.append(1))
    layers = sum(isinstance(m, ebm.SpectralNorm) for m in net.modules())
    ebm.sgld(net, torch.rand(2, 3, 32, 32), 5, 10.0, 0.005, 0.01)
    assert len(calls) == layers  # once per layer for the whole chain, not 5 times


def test_ebm_training_chains_run_with_dropout_on_as_igebm(tiny_images, tmp_path):
    # bug this catches: net.eval() around the training chains, which would switch dropout off there (IGEBM's
    # training graph samples with train=True); and dropout left on where samples are drawn for evaluation
    args = ebm.parse_args(train_args("ebm", tiny_images, tmp_path))
    net, optimizer, scaler = ebm.build(args, torch.device("cpu"))
    buffer = ebm.ReplayBuffer(64, (3, 32, 32), "cpu")
    seen, dropout = [], ebm.dropout
    ebm.dropout = lambda h, p, training: seen.append(training) or dropout(h, p, training)
    try:
        ebm.train_step(net, net, net, optimizer, scaler, buffer, torch.rand(16, 3, 32, 32), args, None)
        assert len(seen) == 9 * (args.sgld_steps + 1) and all(seen)  # K chain steps and the update
        seen.clear()
        ebm.draw_samples(net.eval(), buffer.samples, 4, ebm.parse_args([*TINY["ebm"], "--steps", "2"]),
                         torch.device("cpu"), None)
        assert seen and not any(seen)
    finally:
        ebm.dropout = dropout


def test_ebm_cpu_dropout_keeps_the_mean_and_drops_the_fraction_p():
    # bugs this catches: a mask keeping p instead of 1 - p, a missing 1 / (1 - p) rescaling, dropout in eval mode
    torch.manual_seed(0)
    h = torch.ones(200_000)
    out = ebm.dropout(h, 0.3, True)
    assert (out == 0).float().mean().item() == pytest.approx(0.3, abs=0.005)
    assert out.mean().item() == pytest.approx(1, abs=0.01)
    assert torch.equal(ebm.dropout(h, 0.3, False), h)


def test_ebm_chains_measures_have_known_answers():
    # bugs this catches: a true density that does not integrate to 1 (a dropped 1/3 or std^2), weights normalised
    # over the grid instead of the modes, the reweighting applied the wrong way round
    points, area = ebm_chains.grid(60)
    for name in ebm_chains.TOYS:
        p = ebm_chains.true_density(name, points)
        assert p.sum().item() * area == pytest.approx(1, abs=0.01)
        exact = ebm_chains.compare(name, p, points)
        assert exact["tv"] < 1e-9 and exact["weight_tv"] < 1e-9 and exact["shape_tv"] < 1e-9
        assert exact["location_std"] < 1e-9 and exact["covered"] == exact["modes"]
    p = ebm_chains.true_density("8gaussians", points)
    region, _ = ebm_chains.mode_regions("8gaussians", points)
    heavier = ebm_chains.compare("8gaussians", p * torch.where(region == 0, 2.0, 1.0), points)
    # mode 0 holds 2/9 of the modes' mass instead of 1/8, the others 1/9: weight tv = (7/72 + 7/72) / 2
    assert heavier["weight_tv"] == pytest.approx(7 / 72, abs=1e-3)
    assert heavier["shape_tv"] < 1e-6 and heavier["location_std"] < 1e-6 and heavier["tv"] > 0.05
    gone = ebm_chains.compare("8gaussians", p * torch.where(region == 0, 0.1, 1.0), points)
    assert gone["covered"] == 7


def test_ebm_chains_experiment_runs_at_a_tiny_size_with_equal_sgld_evaluations(tmp_path):
    results = ebm_chains.main(["--iterations", "4", "--seeds", "1", "--grid", "30", "--out", str(tmp_path),
                               "--figure", str(tmp_path / "chains.png")])
    assert len(results) == len(ebm_chains.TOYS) * len(ebm_chains.SCHEMES)
    assert len({r["sgld_evaluations"] for r in results}) == 1  # every scheme gets the same budget
    assert all(0 <= r["tv"] <= 1 and 0 <= r["weight_tv"] <= 1 for r in results)
    table = (tmp_path / "table.md").read_text()
    assert all(s in table for s in ebm_chains.SCHEMES) and (tmp_path / "chains.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))


def test_ebm_precision_and_ood_experiments_run_on_a_trained_run(tiny_images, tmp_path):
    run = ebm.main(train_args("ebm", tiny_images, tmp_path, "--epochs", 1))
    ood = ebm_ood.main([str(run), "--limit-test", "16"])
    assert ood["n_test"] == 16 and set(ood["ood"]) == set(ebm.ood_sets(torch.rand(2, 3, 32, 32), None))
    assert all(row["n"] == 16 and 0 <= row["auroc"] <= 1 for row in ood["ood"].values())
    assert json.loads((run / "ood.json").read_text()) == json.loads(json.dumps(ood))
    assert (run / "ood_energies.png").exists()
    result = ebm_precision.main([str(run), "--n", "8", "--chains", "4", "--steps", "2"])
    assert json.loads((run / "precision.json").read_text()) == json.loads(json.dumps(result))
    moves = result["moves"]["test images"]
    assert moves["n"] == 8 and 0 <= moves["move_abs_diff_mean"] <= 2 * 10 * 0.01
    assert math.isfinite(result["chains"]["final_abs_diff_bf16"])


@pytest.mark.skipif(not REAL_DATA.exists(), reason="the shared CIFAR-10 JPEG copy is not on this machine")
def test_ebm_short_run_on_real_cifar10_stays_finite_and_separates_data_from_negatives(tmp_path):
    run_script("ebm.py", "--data", REAL_DATA, "--data-root", ROOT / "data", "--run-dir", tmp_path, "--width", "8",
               "--sgld-steps", "5", "--batch-size", "32", "--limit-train", "320", "--limit-test", "100",
               "--epochs", "2", "--lr", "1e-3", "--device", "cpu", "--log-every", "5")
    summary = json.loads((only_run(tmp_path) / "summary.json").read_text())
    e_pos, e_neg = summary["last_epoch_energy_pos"], summary["last_epoch_energy_neg"]
    assert summary["rollbacks"] == 0 and math.isfinite(e_pos) and math.isfinite(e_neg)
    assert e_pos < e_neg  # data likelier than the model's own samples


# ------------------------------------------------------------------------------------------------
# .ci/gpu: the GPU check, run at tiny size on the CPU so that the script itself does not rot
# ------------------------------------------------------------------------------------------------

def test_gpu_check_script_runs_on_the_cpu_at_tiny_size(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu"), "--cpu-smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["check"]: row for row in json.loads((tmp_path / "gpu_check.json").read_text())}
    assert (tmp_path / "gpu_check.md").read_text().count("\n") == len(rows) + 2  # header, rule, one line per row
    for model in MODELS:
        assert rows[f"{model} --bench (eager, default precision)"]["status"] == "ok"
        assert rows[f"{model} --bench --no-amp"]["precision"] == "float32"
        assert rows[f"{model}: train 1 epoch, --resume to 2, --sample"]["status"] == "ok"
        assert rows[f"{model} --bench --compile"]["status"] == "skipped"  # with its reason
    assert rows["ncsn: NaN every second step, skipped (default precision)"]["adam_steps"] == 2
    float16 = rows["ncsn: NaN every second step, skipped (float16 precision)"]
    assert float16["status"] == "ok" and float16["loss_scale"] < 2**16  # the GradScaler backed off, on the CPU
    assert all(row["status"] in ("ok", "skipped") and (row["status"] == "ok" or row["why"]) for row in rows.values())
