"""Tests of ebm.py: the sampler, buffer and loss with known answers, the divergence guard, the toy, end to end."""

import json
import math
import subprocess
import sys

import pytest
import torch

import common
import ebm
from test_models import ENV, REAL_DATA, ROOT, run_script, tiny_images

__all__ = ["tiny_images"]  # a pytest fixture: importing it makes it available to the tests below

TINY = ["--width", "8", "--sgld-steps", "3", "--buffer-size", "200", "--batch-size", "16", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tests use one thread, like run_script's subprocesses (on a shared, loaded CPU more threads
    spin-wait on each other and run many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_args(tiny_images, tmp_path, *extra):
    return ["--data", str(tiny_images), "--data-root", str(tmp_path / "data"), "--run-dir", str(tmp_path / "runs"),
            *TINY, *map(str, extra)]


def only_run(folder):
    runs = sorted(p for p in folder.iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


# ------------------------------------------------------------------------------------------------
# Math with known answers
# ------------------------------------------------------------------------------------------------

def test_sgld_in_langevin_proportion_samples_the_gaussian_of_a_quadratic_energy():
    torch.manual_seed(0)
    mu, s = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5

    def energy(x):  # E(x) = ||x - mu||^2 / (2 s^2): exp(-E) is N(mu, s^2 I)
        return ((x - mu) ** 2).sum(1) / (2 * s**2)

    eps = 0.02 * s**2  # small against s^2: the discretisation inflates the variance by only 1 / (1 - eps / 4s^2)
    x0 = 3 * torch.randn(10000, 2, dtype=torch.float64)
    x, _, _ = ebm.sgld(energy, x0, 1000, eps / 2, math.sqrt(eps), grad_clip=None, bounds=None)
    assert torch.allclose(x.mean(0), mu, atol=0.02)
    assert torch.allclose(x.var(0), torch.full((2,), s**2, dtype=torch.float64), rtol=0.05)


def test_replay_buffer_size_restarts_range_and_checkpoint_round_trip(tmp_path):
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
    x, idx = buffer.sample(64)
    buffer.push(torch.rand(64, 3, 32, 32), idx)
    common.atomic_save({"model": "ebm", "buffer": buffer.samples}, tmp_path / "c.pt")
    assert torch.equal(common.load_checkpoint(tmp_path / "c.pt", "ebm")["buffer"], buffer.samples)


def test_a_gradient_step_on_the_loss_lowers_data_energy_relative_to_negatives():
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


def test_toy_energy_is_lower_at_the_modes_than_between_them():
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
# Training: the divergence guard and exact resume (in-process: fast, and main() is the whole program)
# ------------------------------------------------------------------------------------------------

def test_divergence_rolls_back_to_the_last_good_checkpoint_with_a_lower_lr(tiny_images, tmp_path, capsys):
    run = ebm.main(tiny_args(tiny_images, tmp_path, "--epochs", "2", "--log-every", "1", "--inject-nan-at", "6"))
    rows = common.read_metrics(run)
    rollback = [r for r in rows if "rollback" in r]
    assert len(rollback) == 1 and rollback[0]["lr"] == pytest.approx(0.5e-4) and rollback[0]["step"] == 4
    assert "rolled back" in capsys.readouterr().err
    assert rows[-1]["step"] == 8 and rows[-1]["lr"] == pytest.approx(0.5e-4)  # the run continued to the end
    ckpt = common.load_checkpoint(run, "ebm")
    assert ckpt["epoch"] == 2 and ckpt["rollbacks"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["net"].values()) and torch.isfinite(ckpt["buffer"]).all()
    assert json.loads((run / "summary.json").read_text())["rollbacks"] == 1
    with pytest.raises(common.UserError, match="diverged.*last good checkpoint"):
        ebm.main(tiny_args(tiny_images, tmp_path, "--epochs", "1", "--inject-nan-at", "2", "--max-rollbacks", "0"))


def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny_images, tmp_path):
    full = ebm.main(tiny_args(tiny_images, tmp_path / "a", "--epochs", "2"))
    half = ebm.main(tiny_args(tiny_images, tmp_path / "b", "--epochs", "1"))
    assert ebm.main(["--resume", str(half), "--epochs", "2"]) == half
    a, b = common.load_checkpoint(full, "ebm"), common.load_checkpoint(half, "ebm")
    assert a["step"] == b["step"] == 8 and a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert torch.equal(a["buffer"], b["buffer"])
    for name in ("epoch_0002.png", "buffer_0002.png", "chain_0002.png"):
        assert (half / "samples" / name).exists()


# ------------------------------------------------------------------------------------------------
# End to end through the command line
# ------------------------------------------------------------------------------------------------

def test_train_sample_inpaint_eval_bench_end_to_end(tiny_images, tmp_path):
    out = run_script("ebm.py", *tiny_args(tiny_images, tmp_path, "--epochs", "1"))
    run = only_run(tmp_path / "runs")
    assert "epoch 1/1" in out.stdout and "E+" in out.stdout
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json", "samples/epoch_0001.png"):
        assert (run / name).exists()
    rows = common.read_metrics(run)
    assert {"energy_pos", "energy_neg", "gap", "sgld_grad_norm", "lr"} <= set(rows[-1])

    run_script("ebm.py", "--sample", run, "--n", 12, "--steps", 2)
    samples = __import__("numpy").load(run / "samples.npz")["samples"]
    assert samples.shape == (12, 32, 32, 3) and samples.dtype == "uint8" and (run / "samples.png").exists()
    run_script("ebm.py", "--inpaint", run, "--n", 4, "--steps", 2)
    assert (run / "inpaint.png").read_bytes()[:4] == b"\x89PNG"
    out = run_script("ebm.py", "--eval", run, "--n", 16, "--steps", 2, "--fid-extractor", "tiny-random")
    result = json.loads((run / "eval.json").read_text())
    assert result["n_samples"] == 16 and math.isfinite(result["fid"]) and "AUROC" in out.stdout
    assert set(result["ood_auroc"]) == {"uniform noise", "constant colour", "heavy noise (sigma 0.3)",
                                        "shuffled pixels"}
    assert all(0 <= v <= 1 for v in result["ood_auroc"].values()) and (run / "eval_energies.png").exists()
    run_script("ebm.py", "--bench", "--resume", run, "--batch-size", 4)
    bench = json.loads((run / "bench.json").read_text())
    assert bench["train_images_per_s"] > 0 and bench["params"] > 0 and bench["projected_hours_200_epochs_cifar10"] > 0


def test_toy_command_writes_its_figure(tmp_path, monkeypatch):
    monkeypatch.setitem(ebm.TOY, "iterations", 30)
    run = ebm.main(["--toy", "rings", "--run-dir", str(tmp_path)])
    assert (run / "toy.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "toy.json").read_text())["data"] == "rings"


def test_bad_inputs_fail_with_one_clear_line_and_leave_runs_intact(tiny_images, tmp_path, monkeypatch):
    good = ebm.main(tiny_args(tiny_images, tmp_path, "--epochs", "1"))
    before = (good / "checkpoint.pt").read_bytes()
    vae = tmp_path / "vae_run"
    vae.mkdir()
    (vae / "config.json").write_text((good / "config.json").read_text())
    common.atomic_save({"model": "vae", "net": {}}, vae / "checkpoint.pt")
    cut = tmp_path / "cut_run"
    cut.mkdir()
    (cut / "config.json").write_text((good / "config.json").read_text())
    (cut / "checkpoint.pt").write_bytes(before[:1000])
    cases = [  # (arguments, what stderr must say)
        (tiny_args(tiny_images, tmp_path, "--epochs", "0"), "positive integer"),
        (tiny_args(tiny_images, tmp_path, "--restart-rate", "1.5"), "between 0 and 1"),
        (tiny_args(tmp_path / "nope", tmp_path), "no such folder"),
        (["--resume", cut], "corrupt or truncated"),
        (["--sample", vae], "not of ebm"),
        (["--eval", good, "--width", "16", "--fid-extractor", "tiny-random"], "another architecture or width"),
        (["--sample", tmp_path / "missing"], "not a run folder"),
    ]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "ebm.py"), *map(str, a)], env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for a, _ in cases]
    for (a, message), proc in zip(cases, procs):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and message in err and "Traceback" not in err, (a, err)
    assert (good / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [good.name]  # no half-made run folders

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.SVHN", offline)
    with pytest.raises(common.UserError, match="--ood svhn: SVHN is not in .* put test_32x32.mat"):
        ebm.main(["--eval", str(good), "--ood", "svhn", "--fid-extractor", "tiny-random"])
    assert not (good / "eval.json").exists()


def test_two_process_torchrun(tiny_images, tmp_path):
    out = run_script("ebm.py", *tiny_args(tiny_images, tmp_path, "--epochs", "1"), torchrun=True)
    run = only_run(tmp_path / "runs")
    assert "2 process(es)" in out.stdout and common.load_checkpoint(run, "ebm")["step"] == 4  # 64 / 16 per step


@pytest.mark.skipif(not REAL_DATA.exists(), reason="the shared CIFAR-10 JPEG copy is not on this machine")
def test_short_run_on_real_cifar10_stays_finite_and_separates_data_from_negatives(tmp_path):
    run_script("ebm.py", "--data", REAL_DATA, "--data-root", ROOT / "data", "--run-dir", tmp_path, "--width", "8",
               "--sgld-steps", "5", "--batch-size", "32", "--limit-train", "320", "--epochs", "2", "--lr", "1e-3",
               "--device", "cpu", "--log-every", "5")
    summary = json.loads((only_run(tmp_path) / "summary.json").read_text())
    e_pos, e_neg = summary["last_epoch_energy_pos"], summary["last_epoch_energy_neg"]
    assert summary["rollbacks"] == 0 and math.isfinite(e_pos) and math.isfinite(e_neg)
    assert e_pos < e_neg  # data likelier than the model's own samples
