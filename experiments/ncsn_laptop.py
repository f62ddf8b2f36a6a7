"""What a short CPU run of ncsn.py learns first, and the recipe that shows image structure soonest.

    # the runs, one at a time (--epochs 5: the recorded 500 steps; --budget S instead gives each
    # the epochs that fill S CPU seconds of this machine)
    OMP_NUM_THREADS=1 python -m experiments.ncsn_laptop train --epochs 5
    # tables and the figure
    OMP_NUM_THREADS=1 python -m experiments.ncsn_laptop report

Every configuration trains the same small network (width 32, 1.05M parameters) on the first 6,400
images of the JPEG copy of CIFAR-10 (the folder in the environment variable JPEG; without it, the
real CIFAR-10 in data/) for the same single-thread CPU time (--budget seconds:
calibrated from a measured CPU time per step, then each run's own CPU seconds are recorded). What
each run logs every epoch is its test DSM loss per quarter of its noise levels (q1: the largest
sigmas); its previews show what the probability-flow ODE draws after each epoch. The report scores
the final EMA network's samples (64, the ODE at 100 network evaluations, from the same starts)
against 1,000 test images on three measures of image statistics that need no Inception network: the
share of pixel values outside [0, 1] (saturated colour), the 1-Wasserstein distance between the
distributions of pixel values (colour), and the mean absolute log-ratio of the radially averaged
power spectra (how energy spreads over spatial scales: texture and structure). Writes
experiments/results/ncsn_laptop.json and .md, runs/figures/ncsn_laptop.png. A configuration whose
run is not here keeps its recorded scores in the table; a run that fails prints its last line and
leaves its output in runs/ncsn-laptop_NAME.log.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import common  # noqa: E402
import ncsn  # noqa: E402
from experiments.equal_time import run_children  # noqa: E402

RECORD = ROOT / "experiments" / "results" / "ncsn_laptop.json"
JPEG = os.environ.get("JPEG", "cifar10")  # an image-folder copy, or the real CIFAR-10
SMALL = ["--data", JPEG, "--data-root", str(ROOT / "data"), "--width", "32",
         "--channel-mult", "1,2,2", "--num-res-blocks", "1", "--batch-size", "64",
         "--limit-train", "6400", "--limit-test", "500", "--log-every", "20", "--device", "cpu"]
CONFIGS = {  # name -> (flags, what it changes)
    "ncsnv2": ([], "NCSNv2's recipe (the GPU default): sigma_1 50, L 232, lr 1e-4, EMA 0.999"),
    "fast": (["--lr", "1e-3", "--ema", "0.99"], "lr 1e-3, EMA 0.99"),
    "sigma10": (["--lr", "1e-3", "--ema", "0.99", "--sigma-max", "10", "--num-scales", "100"],
                "lr 1e-3, EMA 0.99, sigma_1 10, L 100"),
    "sigma5": (["--lr", "1e-3", "--ema", "0.99", "--sigma-max", "5", "--num-scales", "100"],
               "lr 1e-3, EMA 0.99, sigma_1 5, L 100"),
    "sigma5-L30": (["--lr", "1e-3", "--ema", "0.99", "--sigma-max", "5", "--num-scales", "30"],
                   "lr 1e-3, EMA 0.99, sigma_1 5, L 30 (each level trained 3x as often)"),
    "sigma5-wide": (["--lr", "1e-3", "--ema", "0.99", "--sigma-max", "5", "--num-scales", "100",
                     "--width", "64"],
                    "lr 1e-3, EMA 0.99, sigma_1 5, L 100, width 64 (4x the cost of a step)"),
}


def cpu_seconds_per_step(name, steps=4):
    """Process CPU seconds of one training step (train_step and the EMA update) of a
    configuration."""
    args = ncsn.parse_args([*SMALL, *CONFIGS[name][0]])
    torch.manual_seed(0)
    net, ema, optimizer, scaler = ncsn.build(args, torch.device("cpu"))
    sigmas, x = (ncsn.geometric_sigmas(args.sigma_max, args.sigma_min, args.num_scales),
                 torch.rand(64, 3, 32, 32))
    ncsn.train_step(net, net, optimizer, scaler, x, sigmas, args, None)  # warm-up
    start = time.process_time()
    for step in range(steps):
        ncsn.train_step(net, net, optimizer, scaler, x, sigmas, args, None)
        ncsn.update_ema(ema, net, args.ema, step)
    return (time.process_time() - start) / steps


def train(names, budget, epochs=None):
    """Each configuration for about `budget` CPU seconds (whole epochs of 100 steps), or for
    `epochs` on any machine, one at a time."""
    torch.set_num_threads(1)
    jobs = []
    for name in names:
        per_step = cpu_seconds_per_step(name)
        n_epochs = epochs or max(1, round(budget / (per_step * 100)))
        cmd = [ROOT / "ncsn.py", *SMALL, *CONFIGS[name][0], "--name", f"laptop-{name}",
               "--epochs", n_epochs]
        jobs.append((name, cmd, ROOT / "runs" / f"ncsn-laptop_{name}.log",
                     f"ncsn__laptop-{name}__*", {"epochs": n_epochs, "steps": 100 * n_epochs,
                                                 "cpu_seconds_per_step": per_step}))
    run_children(jobs, 1, RECORD)


def spectrum(x):
    """Radially averaged power spectrum of images (N, 3, 32, 32), averaged over images and
    channels."""
    power = torch.fft.fft2(x - x.mean((2, 3), keepdim=True)).abs().pow(2).mean((0, 1))  # (32, 32)
    f = torch.fft.fftfreq(32)
    radius = (f[:, None] ** 2 + f[None] ** 2).sqrt().mul(32).round().long().flatten()
    return torch.bincount(radius, power.flatten())[1:16] / torch.bincount(radius)[1:16]  # 15 rings


def image_statistics(x, test):
    """The three measures of the docstring: samples x (unclamped) against test images, both
    (N, 3, 32, 32)."""
    clamped = x.clamp(0, 1)
    w1 = sum((clamped[:, c].flatten().sort().values - test[:, c].flatten()[torch.randperm(
        test[:, c].numel())[:clamped[:, c].numel()]].sort().values).abs().mean()
             for c in range(3)) / 3
    return {"outside_0_1": ((x < 0) | (x > 1)).float().mean().item(), "pixel_w1": w1.item(),
            "spectrum_log_ratio": (spectrum(clamped) / spectrum(test)).log().abs().mean().item()}


def report(n=64, record_path=RECORD, figure=ROOT / "runs" / "figures" / "ncsn_laptop.png"):
    """The table (record_path's .md) and the figure. A configuration whose run folder is not here
    (a fresh clone, or `train --only`) keeps the scores recorded when its run was, if any."""
    torch.set_num_threads(1)
    record = json.loads(record_path.read_text())
    names = [n for n in CONFIGS if n in record and record[n]["run"]]
    test = common.load_images(JPEG, str(ROOT / "data"), "test")[:1000].float() / 255
    lines = ["| recipe | steps | CPU s | test DSM, largest-sigma quarter: after epoch 1 / last | "
             "all levels: last | outside [0, 1] | pixel W1 | spectrum log-ratio |",
             "|" + "---|" * 8]
    rows = []
    for name in names:
        run, entry = ROOT / record[name]["run"], record[name]
        if (run / "checkpoint.pt").exists():
            args = ncsn.parse_args(["--sample", str(run), "--device", "cpu", "--sampler", "ode",
                                    "--nfe", "100", "--batch-size", str(n)])
            net, stats = ncsn.load_trained(run, args, torch.device("cpu"))
            torch.manual_seed(0)
            x, nfe = ncsn.draw_samples(net, stats, n, args, torch.device("cpu"), None)
            torch.manual_seed(0)
            logged = [row for row in common.read_metrics(run) if "test_dsm_q1" in row]
            entry.update(image_statistics(x, test),
                         q1_by_epoch=[row["test_dsm_q1"] for row in logged],
                         test_dsm_by_epoch=[row["test_dsm"] for row in logged])
            rows.append((f"{name}: ODE, {nfe} NFE", x[:10]))
        elif "pixel_w1" in entry:
            print(f"{name}: {entry['run']} is not here: its recorded scores (no samples shown)")
        else:
            print(f"{name}: {entry['run']} is not here and has no scores: left out (train it)")
            continue
        lines.append(f"| {CONFIGS[name][1]} | {entry['steps']} | {entry['cpu_seconds']:.0f} | "
                     f"{entry['q1_by_epoch'][1]:.1f} / {entry['q1_by_epoch'][-1]:.1f} | "
                     f"{entry['test_dsm_by_epoch'][-1]:.1f} | {entry['outside_0_1']:.3f} | "
                     f"{entry['pixel_w1']:.3f} | {entry['spectrum_log_ratio']:.2f} |")
        print(lines[-1], flush=True)
    torch.manual_seed(0)
    # how close data is to itself
    reference = image_statistics(test[torch.randperm(len(test))[:n]], test)
    lines.append(f"| 64 test images themselves | | | | | {reference['outside_0_1']:.3f} | "
                 f"{reference['pixel_w1']:.3f} | {reference['spectrum_log_ratio']:.2f} |")
    record_path.write_text(json.dumps(record, indent=2))
    record_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    rows.append(("test images", test[:10]))
    common.save_rows(rows, figure,
                     title="after equal CPU time: the probability-flow ODE from the same starts "
                           "(clamped)")
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the configurations at equal CPU time")
    t.add_argument("--budget", type=float, default=600, help="CPU seconds of one thread per run")
    t.add_argument("--epochs", type=common.positive_int,
                   help="epochs of every run instead of those that fill --budget on this machine")
    t.add_argument("--only", help="comma-separated configuration names (default: all)")
    sub.add_parser("report", help="tables and figure from the runs")
    args = p.parse_args(argv)
    if args.command == "train":
        train(args.only.split(",") if args.only else list(CONFIGS), args.budget, args.epochs)
    else:
        report()


if __name__ == "__main__":
    main()
