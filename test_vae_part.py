"""Tests of vae.py: the likelihood and the bounds against known answers, then the script end to end."""

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch

import common
import vae
from test_models import REAL_DATA, ROOT, run_script, tiny_images  # noqa: F401  (tiny_images is a fixture)


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tests use one thread, like the subprocesses: on a busy machine two spin-waiting threads
    per process can make a tiny convolution 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = ("--width", 8, "--blocks", 1, "--latent-channels", 4, "--mixtures", 3, "--batch-size", 16, "--log-every", 2)


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
def test_discretized_likelihood_sums_to_one_over_all_256_values_including_edges(pinned):
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


def test_uniform_decoder_gives_exactly_8_bits_per_dim(monkeypatch):
    net = vae.VAE(width=8, blocks=1, latent_channels=4, mixtures=2)
    torch.nn.init.zeros_(net.encoder[-1].weight)  # q(z|x) = N(0, I) = p(z): KL exactly 0
    torch.nn.init.zeros_(net.encoder[-1].bias)
    uniform = lambda x, params, m: torch.full((len(x), 32, 32), -3 * math.log(256), dtype=torch.float64)  # noqa: E731
    monkeypatch.setattr(vae, "discretized_logistic_mixture_logp", uniform)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    result = vae.evaluate(net, images, 4, torch.device("cpu"), amp=False)
    assert result["test_bpd"] == pytest.approx(8.0, abs=1e-12)
    assert result["test_distortion_bpd"] == pytest.approx(8.0, abs=1e-12) and result["test_rate_bpd"] == 0
    assert result["active_units"] == 0  # every posterior mean is 0: no unit is active
    bpd, distortion, rate = vae.elbo_bits_per_dim(torch.tensor([-3072 * math.log(2)]), torch.tensor([[3072 * 0.5]]))
    assert (distortion, rate) == pytest.approx((1.0, 0.5 / math.log(2))) and bpd == pytest.approx(distortion + rate)


def test_analytic_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    z = mu + (0.5 * logvar).exp() * torch.randn(400_000, 6, generator=g, dtype=torch.float64)
    monte_carlo = (vae.log_normal(z, mu, logvar) - vae.log_normal(z, 0 * z, 0 * z)).mean(0)  # E_q[log q - log p]
    assert torch.allclose(monte_carlo, vae.gaussian_kl(mu, logvar), atol=0.02, rtol=0.02)
    assert vae.gaussian_kl(torch.zeros(3), torch.zeros(3)).abs().max() == 0  # q = p


def test_iwae_bound_k1_is_the_elbo_in_expectation_and_k8_is_at_least_the_elbo():
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


def test_free_bits_stop_the_gradient_of_a_small_kl_only():
    kl = torch.tensor([[0.5, 5.0], [1.5, 7.0]], requires_grad=True)  # (B, C): channel 0 averages 1.0 nats
    loss = vae.training_loss(torch.zeros(2), kl, beta=1.0, free_nats=2.0)
    loss.backward()
    assert loss.item() == pytest.approx((2.0 + 6.0) / 3072)  # max(2, 1) + max(2, 6)
    assert kl.grad[:, 0].abs().sum() == 0 and (kl.grad[:, 1] > 0).all()


def test_updates_with_non_finite_or_outlying_gradients_are_skipped():
    torch.manual_seed(0)
    net = vae.VAE(width=8, blocks=1, latent_channels=4, mixtures=2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    args = vae.build_parser().parse_args(["--free-bits", "0", "--device", "cpu"])
    x, state = torch.rand(4, 3, 32, 32), {}
    before = [p.detach().clone() for p in net.parameters()]
    *_, skipped = vae.train_step(net, optimizer, x.clone().fill_(float("nan")), 1.0, args, state, torch.device("cpu"))
    assert skipped and all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # a NaN batch: no update
    *_, norm, skipped = vae.train_step(net, optimizer, x, 1.0, args, state, torch.device("cpu"))
    assert not skipped and state["grad_norm_avg"] == norm  # the first finite step sets the running average
    state["grad_norm_avg"] = norm / 100  # the next gradient looks 100x above normal
    before = [p.detach().clone() for p in net.parameters()]
    *_, skipped = vae.train_step(net, optimizer, x, 1.0, args, state, torch.device("cpu"))
    assert skipped and all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


# ------------------------------------------------------------------------------------------------
# vae.py: the script end to end on a tiny image folder
# ------------------------------------------------------------------------------------------------

def only_run(folder):
    runs = list(folder.glob("vae__*"))
    assert len(runs) == 1, runs
    return runs[0]


def folder_digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tiny_images, tmp_path_factory):  # noqa: F811
    """2 epochs in one go, and 1 epoch + --resume to 2: (uninterrupted run, resumed run, data root)."""
    tmp = tmp_path_factory.mktemp("vae")
    common_args = ("--data", tiny_images, "--data-root", tmp / "data", *TINY)
    run_script("vae.py", *common_args, "--epochs", 2, "--run-dir", tmp / "a")
    run_script("vae.py", *common_args, "--epochs", 1, "--run-dir", tmp / "b")
    resumed = only_run(tmp / "b")
    out = run_script("vae.py", "--resume", resumed, "--epochs", 2)
    assert "epoch 2: test" in out.stdout
    return only_run(tmp / "a"), resumed, tmp / "data"


def test_train_writes_the_run_folder_and_logs_bits_per_dim(trained):
    run, _, _ = trained
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl", "summary.json", "metrics.png",
                 "samples/epoch_0002.png", "samples/epoch_0002_t0.7.png", "reconstructions/epoch_0002.png"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "test_bpd" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]  # epoch 0: the model at initialisation
    for r in epochs:
        assert r["test_bpd"] == pytest.approx(r["test_distortion_bpd"] + r["test_rate_bpd"])
        assert 0 < r["test_bpd"] < 12 and 0 <= r["active_units"] <= r["latent_dims"] == 4 * 8 * 8
    assert any("train_bpd" in r and "grad_norm" in r for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and "final_test_bpd_without_ema" in summary


def test_resume_equals_uninterrupted_bit_for_bit(trained):
    run, resumed, _ = trained
    a, b = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (run, resumed))
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for key in ("net", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
               for i in a["optimizer"]["state"])


def test_sample_interpolate_eval_and_bench(trained, tmp_path, capsys):
    run, _, data_root = trained  # the commands run in-process through main(argv): no interpreter start-up
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
    vae.main(["--bench", "--bench-steps", "2", "--run-dir", str(tmp_path), *map(str, TINY)])
    bench = json.loads(next(tmp_path.glob("vae__bench__*/bench.json")).read_text())
    assert bench["train_images_per_s"] > 0 and bench["params"] > 0 and bench["projected_hours_200_epochs_50k"] > 0


def assert_clean_failure(proc, text):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("vae.py: error:") and text in lines[0], proc.stderr


def fails_in_process(argv, text):
    """common.run_main as the script runs it: SystemExit with one line, the one the user would see."""
    with pytest.raises(SystemExit) as exit_info:
        common.run_main(vae.main, [str(a) for a in argv])
    message = str(exit_info.value.code)
    assert message.count("\n") == 0 and ": error: " in message and text in message, message


def test_bad_inputs_fail_with_one_clear_line_and_leave_runs_intact(trained, tiny_images, tmp_path):  # noqa: F811
    run, _, data_root = trained
    fresh = ("--data", tiny_images, "--data-root", data_root, "--run-dir", tmp_path / "runs", *TINY)
    assert_clean_failure(run_script("vae.py", *fresh, "--epochs", 0, check=False), "--epochs")  # the real stderr
    fails_in_process([*fresh, "--batch-size", -1], "--batch-size")
    fails_in_process([*fresh, "--data", tmp_path / "nope"], "no such folder")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # no run folder made

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = folder_digest(copy)
    fails_in_process(["--resume", copy, "--epochs", 3, "--width", 16], "another architecture or width")
    ckpt = copy / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a save cut off halfway
    before["checkpoint.pt"] = folder_digest(copy)["checkpoint.pt"]
    assert_clean_failure(run_script("vae.py", "--resume", copy, "--epochs", 3, check=False), "corrupt or truncated")
    fails_in_process(["--sample", copy], "corrupt or truncated")
    assert folder_digest(copy) == before  # nothing was written into the run folder


def test_two_process_torchrun(tiny_images, tmp_path):  # noqa: F811
    out = run_script("vae.py", "--data", tiny_images, "--data-root", tmp_path / "data", "--run-dir", tmp_path,
                     *TINY, "--epochs", 1, torchrun=True)
    run = only_run(tmp_path)  # rank 0 alone made a folder and saved
    assert (run / "checkpoint.pt").exists() and out.stdout.count("epoch 1: test") == 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == 1 and math.isfinite(rows[-1]["test_bpd"])


@pytest.mark.skipif(not REAL_DATA.exists(), reason="the shared CIFAR-10 JPEG copy is not on this machine")
def test_real_cifar10_copy_bits_per_dim_fall_below_init_and_8(tmp_path):
    run_script("vae.py", "--data", REAL_DATA, "--data-root", ROOT / "data", "--run-dir", tmp_path, *TINY,
               "--limit-train", 1024, "--limit-test", 256, "--batch-size", 32, "--epochs", 1, "--lr", 2e-3,
               "--warmup-steps", 5, "--kl-warmup", 0)
    rows = [json.loads(line) for line in (only_run(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    at_init, final = (r["test_bpd"] for r in rows if "test_bpd" in r)
    assert final < at_init and final < 8
