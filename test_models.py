"""The test suite: math with known answers, data and metrics, and each script end to end.

    python -m pytest -q

Scripts run as subprocesses on a tiny image folder the tests write themselves, with tiny widths,
so the whole suite stays within minutes on two CPU cores.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import common

ROOT = Path(__file__).resolve().parent
REAL_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_script(script, *args, cwd=None, check=True, timeout=300, torchrun=False):
    """Run `python script args` (or a two-process torchrun) and return the CompletedProcess."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    proc = subprocess.run([*launcher, str(ROOT / script), *map(str, args)], cwd=cwd or ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


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


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory):
    """A folder with train/ (64 images) and test/ (16) splits, two class folders each."""
    root = tmp_path_factory.mktemp("tiny")
    for split, n in (("train", 32), ("test", 8)):
        for k, cls in enumerate(("blobs_a", "blobs_b")):
            write_images(root / split / cls, n, seed=100 * k + (split == "test"))
    return root


# ------------------------------------------------------------------------------------------------
# common.py: data
# ------------------------------------------------------------------------------------------------

def test_odd_images_are_converted_to_rgb_32x32(tmp_path):
    write_images(tmp_path / "a", 3, size=(64, 48), mode="L", ext="jpg")
    write_images(tmp_path / "b", 3, size=(20, 40), mode="RGBA", ext="webp", seed=1)
    write_images(tmp_path / "c", 3, size=(32, 32), mode="P", ext="bmp", seed=2)
    write_images(tmp_path / "d", 3, mode="RGB", ext="png", seed=3)
    (tmp_path / "d" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    train = common.load_images(str(tmp_path), str(tmp_path / "cache"), "train")
    test = common.load_images(str(tmp_path), str(tmp_path / "cache"), "test")
    assert train.dtype == torch.uint8 and train.shape[1:] == (3, 32, 32)
    assert len(train) + len(test) == 12 and len(test) == 1  # 5% of 12 rounds to 1; the broken file is skipped
    grey = common._to_32x32(tmp_path / "a" / "0000.jpg")
    assert grey.shape == (32, 32, 3) and (grey[..., 0] == grey[..., 1]).all()


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


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(common.UserError, match="no such folder"):
        common.load_images(str(tmp_path / "nope"), str(tmp_path), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="no images"):
        common.load_images(str(tmp_path / "empty"), str(tmp_path), "train")


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
    assert common.fid_from_features(f1, f2) == pytest.approx(exact.item(), rel=0.02)


def test_metric_pipeline_offline_scores_itself_near_zero_and_shifted_worse(tiny_images, tmp_path):
    train = common.load_images(str(tiny_images), str(tmp_path), "train").float() / 255
    same = common.generative_metrics(train, str(tiny_images), str(tmp_path), extractor="tiny-random")
    shifted = common.generative_metrics((train + 0.3).clamp(0, 1), str(tiny_images), str(tmp_path),
                                        extractor="tiny-random")
    assert same["n_samples"] == 64 and same["n_reference"] == 64 and same["extractor"] == "tiny-random"
    assert abs(same["fid"]) < 1e-6 and shifted["fid"] > 0.01
    assert shifted["kid_mean"] > same["kid_mean"] and same["is_mean"] >= 1.0
    assert list((tmp_path / "fidelity_cache").iterdir())  # reference statistics were cached


def test_metrics_without_weights_name_the_flag(tiny_images, tmp_path, monkeypatch):
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached weights
    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", offline)
    with pytest.raises(common.UserError, match="--fid-weights FILE"):
        common.generative_metrics(torch.rand(10, 3, 32, 32), str(tiny_images), str(tmp_path))


def test_to_uint8_clamps_before_converting():
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.7])
    assert common.to_uint8(x).tolist() == [0, 0, 128, 255, 255]


# ------------------------------------------------------------------------------------------------
# common.py: grids, plots, run plumbing, command line
# ------------------------------------------------------------------------------------------------

def test_grids_and_metric_plots_are_written(tmp_path):
    common.save_grid(torch.rand(10, 3, 32, 32) * 2 - 0.5, tmp_path / "grid.png")
    common.save_rows([("a", torch.rand(4, 3, 32, 32)), ("b", torch.rand(2, 3, 32, 32))], tmp_path / "rows.png")
    log = common.RunLog(tmp_path)
    for step in range(5):
        log.log(step, loss=1.0 / (step + 1), lr=1e-4)
    log.close()
    assert [r["step"] for r in common.read_metrics(tmp_path)] == list(range(5))
    path = common.plot_metrics(tmp_path)
    for name in ("grid.png", "rows.png", path.name):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_checkpoints_refuse_code_corruption_and_other_models(tmp_path):
    good = tmp_path / "good.pt"
    common.atomic_save({"model": "ncsn", "net": {"w": torch.ones(2)}, "rng": common.rng_state()}, good)
    ckpt = common.load_checkpoint(good, "ncsn")
    common.set_rng_state(ckpt["rng"])
    with pytest.raises(common.UserError, match="not of vae"):
        common.load_checkpoint(good, "vae")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:100])
    with pytest.raises(common.UserError, match="corrupt or truncated"):
        common.load_checkpoint(tmp_path / "cut.pt", "ncsn")
    torch.save({"model": "ncsn", "payload": Path("x")}, tmp_path / "code.pt")  # an arbitrary object: a pickle
    with pytest.raises(common.UserError, match="pickled code"):
        common.load_checkpoint(tmp_path / "code.pt", "ncsn")
    with pytest.raises(common.UserError, match="no checkpoint"):
        common.load_checkpoint(tmp_path / "missing", "ncsn")


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


@pytest.mark.skipif(not REAL_DATA.exists(), reason="the shared CIFAR-10 JPEG copy is not on this machine")
def test_explore_on_real_cifar10_copy(tmp_path):
    stats = common.explore(str(REAL_DATA), str(ROOT / "data"), tmp_path)
    assert stats["train_images"] == 50000 and stats["test_images"] == 10000
    assert set(stats["images_per_class"].values()) == {5000}
    assert all(0.4 < m < 0.55 for m in stats["channel_mean"])


# ------------------------------------------------------------------------------------------------
# ncsn.py
# ------------------------------------------------------------------------------------------------

import ncsn  # noqa: E402

NCSN_TINY = ["--width", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--num-scales", "10",
             "--steps-per-level", "1", "--batch-size", "16", "--log-every", "2", "--test-images", "16"]


def gaussian_score(mu, s2):
    """The exact score of N(mu, s^2 I) convolved with N(0, sigma^2 I): -(x - mu) / (s^2 + sigma^2)."""
    return lambda x, sigma: -(x - mu) / (s2 + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2)


def test_dsm_loss_of_the_exact_score_reaches_the_closed_form_minimum():
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


def test_final_denoising_step_is_the_posterior_mean():
    torch.manual_seed(0)
    mu, s2, sigma = torch.tensor([1.0, -2.0]), 0.7, torch.tensor(0.4)
    y = mu + (s2 + sigma**2) ** 0.5 * torch.randn(1000, 2)  # noisy observations of N(mu, s2 I)
    posterior_mean = mu + s2 / (s2 + sigma**2) * (y - mu)
    assert torch.allclose(ncsn.tweedie_denoise(gaussian_score(mu, s2), y, sigma), posterior_mean, atol=1e-6)


def test_annealed_langevin_recovers_mixture_weights_and_plain_langevin_does_not():
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


def test_geometric_sigmas_and_score_net_shapes():
    sigmas = ncsn.geometric_sigmas(50, 0.01, 232)
    assert sigmas[0].item() == pytest.approx(50) and sigmas[-1].item() == pytest.approx(0.01)
    ratios = sigmas[1:] / sigmas[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-4)
    default = ncsn.build_net(ncsn.build_parser().parse_args([]))
    assert 20e6 < sum(p.numel() for p in default.parameters()) < 35e6  # the GPU size
    net = ncsn.ScoreNet(8, (1, 2), 1)
    x, sigma = torch.rand(3, 3, 32, 32), torch.tensor([0.01, 1.0, 50.0])
    assert net(x, sigma).shape == (3, 3, 32, 32)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_non_finite_steps_leave_the_weights_alone_and_too_many_stop_the_run(tiny_images, tmp_path, monkeypatch):
    dsm = ncsn.dsm_loss
    monkeypatch.setattr(ncsn, "dsm_loss", lambda *a, **k: dsm(*a, **k) * float("nan"))  # every step diverges
    argv = ["--data", str(tiny_images), "--data-root", str(tmp_path), "--epochs", "1", *NCSN_TINY]
    ncsn.main([*argv, "--run-dir", str(tmp_path / "a"), "--max-bad-steps", "100"])
    ckpt = torch.load(next((tmp_path / "a").glob("*/checkpoint.pt")), weights_only=True)
    torch.manual_seed(1)  # the run's seed: the same initial weights
    initial = ncsn.build_net(ncsn.build_parser().parse_args(NCSN_TINY)).state_dict()
    assert all(torch.equal(ckpt["net"][k], initial[k]) for k in initial)  # four NaN steps changed nothing
    with pytest.raises(common.UserError, match="training diverged.*last good checkpoint"):
        ncsn.main([*argv, "--run-dir", str(tmp_path / "b"), "--max-bad-steps", "2"])


def test_ncsn_toy_experiment_reproduces_the_paper_figure(tmp_path):
    out = run_script("ncsn.py", "--toy", "--run-dir", tmp_path)
    shares = json.loads(next(tmp_path.glob("ncsn_toy__*/toy.json")).read_text())
    assert "share of samples in the (5,5) mode" in out.stdout
    data, plain, annealed, learned = shares.values()
    assert abs(data - 0.8) < 0.05 and abs(annealed - 0.8) < 0.05 and abs(learned - 0.8) < 0.07
    assert abs(plain - 0.8) > 0.15
    assert next(tmp_path.glob("ncsn_toy__*/toy.png")).stat().st_size > 10_000


@pytest.fixture(scope="module")
def ncsn_runs(tiny_images, tmp_path_factory):
    """Two epochs in one go, and one epoch then --resume to two."""
    tmp = tmp_path_factory.mktemp("ncsn")
    common_args = ["--data", tiny_images, "--data-root", tmp / "data", "--run-dir", tmp / "runs", *NCSN_TINY]
    run_script("ncsn.py", *common_args, "--epochs", "2", "--name", "full")
    run_script("ncsn.py", *common_args, "--epochs", "1", "--name", "half")
    half = next((tmp / "runs").glob("ncsn__half__*"))
    run_script("ncsn.py", "--resume", half, "--epochs", "2")
    return next((tmp / "runs").glob("ncsn__full__*")), half, common_args


def test_ncsn_resume_is_bit_identical_to_an_uninterrupted_run(ncsn_runs):
    full, half, _ = ncsn_runs
    a, b = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (full, half))
    assert a["step"] == b["step"] == 8 and a["epoch"] == b["epoch"] == 2
    for key in ("net", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert not all(torch.equal(a["net"][k], a["ema"][k]) for k in a["net"])  # the EMA is a different average
    for name in ("config.json", "metrics.jsonl", "summary.json", "samples/epoch_0001.png", "samples/epoch_0002.png"):
        assert (full / name).exists()
    rows = common.read_metrics(full)
    assert {"test_dsm_q1", "test_dsm_q4", "img_per_s", "loss"} <= {k for r in rows for k in r}


def test_ncsn_sample_inpaint_eval_and_bench(ncsn_runs, tmp_path):
    full, _, common_args = ncsn_runs
    ncsn.main(["--sample", str(full), "--n", "10"])
    samples = np.load(full / "samples.npz")["samples"]
    assert samples.shape == (10, 32, 32, 3) and samples.dtype == np.uint8
    assert (full / "samples.png").exists() and (full / "trajectory.png").exists()
    ncsn.main(["--inpaint", str(full)])
    assert (full / "inpaint_right_half.png").exists() and (full / "inpaint_centre.png").exists()
    ncsn.main(["--eval", str(full), "--n", "12", "--fid-extractor", "tiny-random"])
    result = json.loads((full / "eval.json").read_text())
    assert result["n_samples"] == 12 and math.isfinite(result["fid"]) and result["nfe_per_sample"] == 11
    assert "test_dsm" in result
    ncsn.main(["--bench", "--run-dir", str(tmp_path), "--batch-size", "4", "--sample-batch", "8", *NCSN_TINY[:6]])
    bench = json.loads(next(tmp_path.glob("ncsn__*/bench.json")).read_text())
    assert bench["train_images_per_s"] > 0 and bench["parameters"] < 100_000 and bench["nfe_per_sample"] == 1161


def test_inpainting_keeps_the_observed_pixels():
    torch.manual_seed(0)
    y = torch.rand(2, 3, 32, 32)
    mask = torch.zeros_like(y, dtype=torch.bool)
    mask[..., :16] = True
    net = ncsn.ScoreNet(8, (1, 2), 1)
    with torch.no_grad():
        x, _ = ncsn.annealed_langevin(net, torch.rand_like(y), ncsn.geometric_sigmas(1, 0.01, 3), 2, 2e-5,
                                      observed=y, mask=mask)
    assert torch.equal(x[mask], y[mask]) and not torch.equal(x[~mask], y[~mask])


def test_ncsn_bad_inputs_fail_cleanly_and_leave_runs_intact(ncsn_runs, tmp_path):
    full, _, common_args = ncsn_runs
    before = {p.name: p.stat().st_mtime_ns for p in full.iterdir()}
    bad_ckpt = tmp_path / "bad"
    bad_ckpt.mkdir()
    (bad_ckpt / "config.json").write_text((full / "config.json").read_text())
    (bad_ckpt / "checkpoint.pt").write_bytes((full / "checkpoint.pt").read_bytes()[:500])
    train = [str(a) for a in common_args]
    checks = [
        ([*train, "--epochs", "0"], "positive integer"),
        ([*train, "--batch-size", "-1"], "positive integer"),
        ([*train, "--data", str(tmp_path / "missing")], "no such folder"),
        ([*train, "--ema", "1.5"], "--ema must be in"),
        (["--resume", str(full), "--epochs", "2"], "already has 2 epochs"),
        (["--sample", str(full), "--width", "16"], "another architecture or width"),
        (["--sample", str(tmp_path)], "not a run folder"),
        (["--sample", str(bad_ckpt)], "corrupt or truncated"),
    ]
    for argv, message in checks:  # run_main turns each error into one line and a non-zero exit
        with pytest.raises(SystemExit) as exit_info:
            common.run_main(ncsn.main, argv)
        assert isinstance(exit_info.value.code, str) and message in exit_info.value.code, argv
        assert "\n" not in exit_info.value.code
    proc = run_script("ncsn.py", "--sample", bad_ckpt, check=False)  # and as a real process: no traceback
    assert proc.returncode == 1 and "corrupt or truncated" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in full.iterdir()} == before  # nothing in the run was touched


def test_ncsn_two_process_torchrun(tiny_images, tmp_path):
    run_script("ncsn.py", "--data", tiny_images, "--data-root", tmp_path / "data", "--run-dir", tmp_path / "runs",
               "--epochs", "1", *NCSN_TINY, torchrun=True)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1  # rank 0 alone made a run folder
    ckpt = torch.load(runs[0] / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4  # 64 images, 8 per rank per step: 4 steps cover the epoch


@pytest.mark.skipif(not REAL_DATA.exists(), reason="the shared CIFAR-10 JPEG copy is not on this machine")
def test_ncsn_learns_real_cifar10(tmp_path):
    args = ["--data", REAL_DATA, "--data-root", ROOT / "data", "--run-dir", tmp_path, "--limit-train", 2048,
            "--width", "16", "--channel-mult", "1,2,2", "--num-res-blocks", "1", "--num-scales", "10",
            "--steps-per-level", "1", "--batch-size", "32", "--test-images", "200", "--lr", "1e-3", "--ema", "0",
            "--log-every", "16"]
    run_script("ncsn.py", *args, "--epochs", "3", timeout=600)  # 3 x 64 steps
    rows = common.read_metrics(next(tmp_path.glob("ncsn__*")))
    dsm = [r["test_dsm"] for r in rows if "test_dsm" in r]  # before training, then after each epoch
    assert len(dsm) == 4 and dsm[-1] < 0.8 * dsm[0]
