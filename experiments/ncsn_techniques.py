"""NCSN 2019's setting against NCSNv2's at equal CPU time, then NCSNv2's techniques one at a time.

Makes experiments/README.md's section "The 2019 setting against NCSNv2's, at equal CPU time": the
per-sigma test DSM table of both presets, the ablation table (experiments/results/ncsn_techniques.md
and .json), runs/figures/ncsn_techniques.png (per-sigma test DSM of every run) and
runs/figures/ncsn_techniques_samples.png (every run's samples), and the technique-4 table
(T, eps on the exact score of a Gaussian: experiments/results/ncsn_technique4.md). From the
repository root:

    # 3 runs, 2 at a time (--epochs 5: the recorded 500 steps; --budget S instead gives each the
    # epochs that fill S CPU seconds of this machine)
    OMP_NUM_THREADS=1 python -m experiments.ncsn_techniques train --epochs 5 presets
    # 6 more
    OMP_NUM_THREADS=1 python -m experiments.ncsn_techniques train --epochs 5 ablation
    # tables, figures
    OMP_NUM_THREADS=1 python -m experiments.ncsn_techniques report
    # technique 4
    OMP_NUM_THREADS=1 python -m experiments.ncsn_techniques langevin

Equal time on a shared machine: wall-clock time depends on what else runs, so every run gets the
same *process CPU seconds* of one thread. `train` first measures each configuration's CPU seconds
per training step (time.process_time, the configurations interleaved in one process), gives each the
number of epochs that fills --budget seconds, and records the CPU seconds each run really used
(its rusage) in experiments/results/ncsn_techniques.json. All numbers are CPU-scale, on the JPEG
copy of CIFAR-10 (the environment variable JPEG, or the real CIFAR-10).
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import common
import ncsn
from experiments.equal_time import run_children

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "experiments" / "results" / "ncsn_techniques.json"
DATA = ["--data", os.environ.get("JPEG", "cifar10"),
        "--data-root", str(ROOT / "data")]  # the JPEG copy of CIFAR-10 ($JPEG, if set)
SMALL = ["--width", "32", "--channel-mult", "1,2,2", "--num-res-blocks", "1", "--batch-size", "64",
         "--limit-train", "6400", "--limit-test", "500", "--log-every", "20", "--device", "cpu"]
CONFIGS = {  # name -> (flags on top of DATA + SMALL, what the row changes)
    "ncsnv2": ([], "NCSNv2's setting (the default preset)"),
    "ncsn2019": (["--preset", "ncsn2019"], "NCSN 2019's setting (--preset ncsn2019)"),
    "ncsnv2-lr1e-3": (["--lr", "1e-3"], "NCSNv2 at the 2019 lr 1e-3"),
}
ABLATION_BASE = ["--lr", "1e-3"]  # chosen after the first three runs: see README
CONFIGS.update({
    "ncsnv2-lr1e-3-seed2": ([*ABLATION_BASE, "--seed", "2"],
                            "the same, another seed (seed-to-seed spread)"),
    "sigma1-1": ([*ABLATION_BASE, "--sigma-max", "1"],
                 "technique 1 off: sigma_1 = 1 (232 levels 1 -> 0.01)"),
    "L10": ([*ABLATION_BASE, "--num-scales", "10"], "technique 2 off: L = 10 levels 50 -> 0.01"),
    "unconditional": ([*ABLATION_BASE, "--score-param", "unconditional"],
                      "technique 3 as NCSNv2's code: s = f(x) / sigma, f never told sigma"),
    "embed": ([*ABLATION_BASE, "--score-param", "embed"],
              "technique 3 off: s = f(x, sigma), no division"),
    "no-ema": ([*ABLATION_BASE, "--ema", "0"], "technique 5 off: no EMA"),
})
GROUPS = {"presets": ["ncsnv2", "ncsn2019", "ncsnv2-lr1e-3"],
          "ablation": ["ncsnv2-lr1e-3-seed2", "sigma1-1", "L10", "unconditional",
                       "embed", "no-ema"]}
# NCSN 2019's levels: its network knows only these
LADDER_2019 = ncsn.geometric_sigmas(1.0, 0.01, 10).tolist()
# 0.01, 0.0278, 0.0774, 0.215, 0.599: its rungs
TEST_SIGMAS = (*LADDER_2019[::-2], 1.0, 3.0, 10.0, 50.0)


def argv_of(name):
    return [*DATA, *SMALL, "--name", f"techniques-{name}", *CONFIGS[name][0]]


def cpu_seconds_per_step(names, steps=6, rounds=3):
    """Median process CPU seconds of one training step (train_step + EMA update) per configuration,
    measured in this process with the configurations interleaved, so that they share the same
    machine conditions."""
    torch.set_num_threads(1)
    setups = {}
    for name in names:
        args = ncsn.parse_args(argv_of(name))
        torch.manual_seed(0)
        net, ema, optimizer, scaler = ncsn.build(args, torch.device("cpu"))
        setups[name] = (args, net, ema, optimizer, scaler,
                        ncsn.geometric_sigmas(args.sigma_max, args.sigma_min, args.num_scales))
    x = torch.rand(64, 3, 32, 32)
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name, (args, net, ema, optimizer, scaler, sigmas) in setups.items():
            ncsn.train_step(net, net, optimizer, scaler, x, sigmas, args, None)  # warm-up
            start = time.process_time()
            for step in range(steps):
                ncsn.train_step(net, net, optimizer, scaler, x, sigmas, args, None)
                ncsn.update_ema(ema, net, args.ema, step)
            times[name].append((time.process_time() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def train(names, budget, parallel=2, epochs=None):
    """Each configuration for --budget CPU seconds (whole epochs of 100 steps), or for --epochs on
    any machine, `parallel` at a time."""
    per_step = cpu_seconds_per_step(names)
    jobs = []
    for name in names:
        n_epochs = epochs or max(1, round(budget / (per_step[name] * 100)))
        jobs.append((name, [ROOT / "ncsn.py", *argv_of(name), "--epochs", n_epochs],
                     ROOT / "runs" / f"ncsn_techniques_{name}.log", f"ncsn__techniques-{name}__*",
                     {"epochs": n_epochs, "steps": n_epochs * 100,
                      "cpu_seconds_per_step_measured": per_step[name]}))
    run_children(jobs, parallel, RECORD)


def load_run(run, *extra):
    """(args, EMA network, its state) of a finished run, on the CPU; `extra` flags choose its
    sampler."""
    args = ncsn.parse_args(["--sample", str(run), "--device", "cpu", *extra])
    return (args, *ncsn.load_trained(run, args, torch.device("cpu")))


def dsm_per_sigma(net, test, sigmas, args):
    """{sigma: test DSM loss at that one sigma}, with the same noise for every sigma and every run
    (ncsn.test_metrics' fixed generator)."""
    return {float(s): ncsn.test_metrics(net, test, torch.tensor([float(s)]), args,
                                        torch.device("cpu"), None)["test_dsm"] for s in sigmas}


def per_sigma_losses(record, names):
    """Each run's test DSM loss at TEST_SIGMAS (EMA weights, 500 test images, the same noise for
    every run)."""
    test = common.load_images(DATA[1], DATA[3], "test")[:500]
    for name in names:
        if list(record[name].get("test_dsm_at_sigma", {})) != [f"{s:.3g}" for s in TEST_SIGMAS]:
            args, net, _ = load_run(ROOT / record[name]["run"])
            losses = dsm_per_sigma(net, test, TEST_SIGMAS, args)
            record[name]["test_dsm_at_sigma"] = {f"{k:.3g}": v for k, v in losses.items()}
            RECORD.write_text(json.dumps(record, indent=2))
    return {name: list(record[name]["test_dsm_at_sigma"].values()) for name in names}


def markdown_table(record, losses, names):
    head = ("| run | " + " | ".join(f"sigma {s:.3g}" for s in TEST_SIGMAS) + " | steps | CPU s |\n|"
            + "---|" * (len(TEST_SIGMAS) + 3) + "\n")
    rows = "".join(f"| {CONFIGS[n][1]} | " + " | ".join(f"{v:.1f}" for v in losses[n])
                   + f" | {record[n]['steps']} | {record[n]['cpu_seconds']:.0f} |\n" for n in names)
    return (head + rows + "| a zero score (D/2) | " + " | ".join(["1536.0"] * len(TEST_SIGMAS))
            + " | | |\n")


def between_rungs(record, names=("ncsn2019", "L10", "ncsnv2-lr1e-3", "unconditional", "embed")):
    """How well each network knows the sigmas it was not trained at: the test DSM halfway
    (geometric mean) between two neighbouring levels of its ladder, against the geometric mean of
    the losses at the two levels (the loss changes smoothly with sigma), over up to ten pairs spread
    over [0.01, 1]."""
    test = common.load_images(DATA[1], DATA[3], "test")[:500]
    lines = ["| run | s = | levels | loss at its levels (mean) | halfway between (mean) | "
             "halfway / expected, mean (max) |", "|" + "---|" * 6]
    for name in [n for n in names if n in record and record[n]["run"]]:
        args, net, _ = load_run(ROOT / record[name]["run"])
        inside = ncsn.geometric_sigmas(args.sigma_max, args.sigma_min, args.num_scales)
        inside = inside[inside <= 1.0 + 1e-6]
        pick = torch.linspace(0, len(inside) - 2, min(10, len(inside) - 1)).round().long()
        upper, lower = inside[pick], inside[pick + 1]
        at_upper, at_lower, halfway = (
            torch.tensor(list(dsm_per_sigma(net, test, sigmas.tolist(), args).values()))
            for sigmas in (upper, lower, (upper * lower).sqrt()))
        ratio = halfway / (at_upper * at_lower).sqrt()
        param = {"divide": "f(x, sigma) / sigma", "unconditional": "f(x) / sigma",
                 "embed": "f(x, sigma)"}[args.score_param]
        lines.append(f"| {CONFIGS[name][1]} | {param} | {args.num_scales} | {at_upper.mean():.1f} "
                     f"| {halfway.mean():.1f} | {ratio.mean():.2f} ({ratio.max():.2f}) |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


@torch.inference_mode()
def sample_rows(record, names, n=8):
    """Each run's samples from the same starts: the probability-flow ODE on the run's own levels
    (one Heun step between neighbours: cheap, and the same sampler for every run), and the two
    presets with their own annealed Langevin sampler (paper settings)."""
    rows = []
    for name in names:
        run = ROOT / record[name]["run"]
        for extra in ((["--sampler", "ode"], []) if name in ("ncsnv2", "ncsn2019")
                      else (["--sampler", "ode"],)):
            args, net, stats = load_run(run, "--batch-size", str(n), *extra)
            torch.manual_seed(0)
            start = time.process_time()
            x, nfe = ncsn.draw_samples(net, stats, n, args, torch.device("cpu"), None)
            rows.append((f"{name}: {ncsn.SAMPLERS[args.sampler]}, {nfe} NFE "
                         f"({(time.process_time() - start) / n:.1f} CPU s each)", x))
            print(rows[-1][0], flush=True)
    return rows


def report():
    """Tables (printed, and runs/ncsn_techniques.md), the per-sigma figure and the sample grids."""
    plt = common.pyplot()
    torch.set_num_threads(1)
    record = json.loads(RECORD.read_text())
    names = [n for n in CONFIGS if n in record and record[n]["run"]]
    losses = per_sigma_losses(record, names)
    presets = [n for n in GROUPS["presets"] if n in names]
    ablation = ["ncsnv2-lr1e-3", *[n for n in GROUPS["ablation"] if n in names]]
    text = ("Test DSM loss at fixed sigmas (500 JPEG-copy test images, EMA weights, the same noise "
            "for every run; CPU-scale):\n\n" + markdown_table(record, losses, presets)
            + "\nAblation:\n\n" + markdown_table(record, losses, ablation)
            + "\nBetween the levels:\n\n" + between_rungs(record))
    (RECORD.parent / "ncsn_techniques.md").write_text(text)
    print(text)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name in presets:
        axes[0].plot(TEST_SIGMAS, losses[name], "o-", label=CONFIGS[name][1])
    axes[0].axhline(1536, color="gray", ls=":", lw=1, label="a zero score (D/2)")
    axes[0].set(xscale="log", yscale="log", xlabel="sigma", ylabel="test DSM loss",
                title="the two papers' settings at equal CPU time")
    base = losses["ncsnv2-lr1e-3"]
    for name in ablation[1:]:
        axes[1].plot(TEST_SIGMAS, [v / b for v, b in zip(losses[name], base)], "o-",
                     label=CONFIGS[name][1])
    axes[1].axhline(1, color="k", lw=1)
    axes[1].set(xscale="log", yscale="log", xlabel="sigma", ylabel="test DSM / NCSNv2 at lr 1e-3",
                title="one technique off at a time (above 1: worse)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle("NCSN on the JPEG copy of CIFAR-10, CPU-scale (width 32, 500 steps per run)")
    fig.tight_layout()
    fig.savefig(ROOT / "runs" / "figures" / "ncsn_techniques.png", dpi=90)
    plt.close(fig)
    common.save_rows(sample_rows(record, presets + ablation[1:]), ROOT / "runs" / "figures" /
                     "ncsn_techniques_samples.png",
                     title="samples from each run (values clamped to [0, 1])")


def ncsnv2_variance_ratio(eps, steps, gamma, sigma_min):
    """NCSNv2's own technique-4 prediction, which assumes each level starts in equilibrium at the
    previous sigma: a^2T (gamma^2 - c) + c (ncsn.langevin_variance_ratio has the carried-over one).
    Its eps for 232 levels from 50 to 0.01 and T = 5 is the paper's 6.2e-6."""
    b = eps / sigma_min**2
    c = 2 / (2 - b)
    return (1 - b) ** (2 * steps) * (gamma**2 - c) + c


def langevin(n=2000):
    """Technique 4 where the answer is known: annealed Langevin with the exact score of a Gaussian
    with CIFAR-10's spectrum (experiments.ncsn_samplers), started from a draw of p_sigma_1: the
    final spread (before denoising) against the truth and against both predictions of
    ncsn.langevin_variance_ratio, for the paper's (T, eps) and worse ones."""
    from experiments.ncsn_samplers import cifar_spectrum, gaussian_problem

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    score, exact_sample, errors = gaussian_problem(n, g, cifar_spectrum(DATA[1], DATA[3]))
    eps_v2 = ncsn.langevin_eps(ncsn.geometric_sigmas(50, 0.01, 232), 5)
    eps_t1 = ncsn.langevin_eps(ncsn.geometric_sigmas(50, 0.01, 232), 1)
    settings = [  # (what, sigma_max, L, T, eps)
        ("NCSNv2: L 232, T 5, eps 6.2e-6", 50, 232, 5, 6.2e-6),
        ("T 5, eps from the carried-over ratio", 50, 232, 5, eps_v2),
        ("T 1, eps 6.2e-6", 50, 232, 1, 6.2e-6),
        ("T 1, eps from the carried-over ratio", 50, 232, 1, eps_t1),
        ("T 5, eps 10x smaller", 50, 232, 5, 6.2e-7),
        ("T 5, eps 10x larger", 50, 232, 5, 6.2e-5),
        ("L 10 (technique 2 off), T 5, eps 6.2e-6", 50, 10, 5, 6.2e-6),
        ("NCSN 2019: sigma 1 -> 0.01, L 10, T 100, eps 2e-5", 1, 10, 100, 2e-5),
    ]
    lines = ["| setting | NFE | std ratio predicted, NCSNv2's formula | predicted, carried over | "
             "measured, directions below sigma_L | measured, 30 widest | KL per dim |",
             "|" + "---|" * 7]
    for what, sigma_max, levels, steps, eps in settings:
        sigmas = ncsn.geometric_sigmas(sigma_max, 0.01, levels)
        gamma = (sigmas[0] / sigmas[1]).item()
        stable = gamma**2 * (1 - eps / 0.01**2) ** (2 * steps) < 1
        predicted = [ncsnv2_variance_ratio(eps, steps, gamma, 0.01) ** 0.5,
                     ncsn.langevin_variance_ratio(eps, steps, gamma, 0.01) ** 0.5]
        with torch.no_grad():
            # a draw of p_sigma_1
            start = exact_sample() + sigma_max * torch.randn(n, 3072, generator=g)
            torch.manual_seed(0)
            x = ncsn.annealed_langevin(score, start, sigmas, steps, eps, denoise=False)
        e = errors(x)
        lines.append(f"| {what} | {levels * steps:,} | {predicted[0]:.3f} | "
                     f"{predicted[1]:.3f} | {e['spread_tight']:.3f} | {e['spread_wide']:.3f} | "
                     f"{e['kl_per_dim']:.4f} |" if stable
                     else f"| {what} | {levels * steps:,} | {predicted[0]:.3f} | "
                     f"grows without bound | {e['spread_tight']:.3f} | {e['spread_wide']:.3f} | "
                     f"{e['kl_per_dim']:.4f} |")
        print(lines[-1], flush=True)
    (RECORD.parent / "ncsn_technique4.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a group of configurations at equal CPU time")
    t.add_argument("group", choices=GROUPS)
    t.add_argument("--budget", type=float, default=600, help="CPU seconds of one thread per run")
    t.add_argument("--parallel", type=int, default=2, help="runs at a time")
    t.add_argument("--only", help="comma-separated configurations of the group (default: all)")
    t.add_argument("--epochs", type=common.positive_int,
                   help="epochs of every run instead of those that fill --budget on this machine")
    sub.add_parser("report",
                   help="per-sigma test DSM tables, figure and sample grids from the runs")
    sub.add_parser("langevin", help="technique 4: (T, eps) on the exact score of a Gaussian")
    args = p.parse_args(argv)
    if args.command == "train":
        names = args.only.split(",") if args.only else GROUPS[args.group]
        if not set(names) <= set(GROUPS[args.group]):
            p.error(f"--only: choose from {', '.join(GROUPS[args.group])}")
        train(names, args.budget, args.parallel, args.epochs)
    elif args.command == "report":
        report()
    else:
        langevin()


if __name__ == "__main__":
    main()
