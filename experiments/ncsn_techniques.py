"""NCSN 2019's setting against NCSNv2's at equal CPU time, then NCSNv2's techniques one at a time.

Makes README's "NCSN: the 2019 setting against NCSNv2's, at equal CPU time" section: the per-sigma test DSM
table of both presets, the ablation table, runs/figures/ncsn_techniques.png (per-sigma test DSM of every run)
and runs/figures/ncsn_presets_samples.png (both presets' samples), and the technique-4 table (T, eps on the
exact score of a Gaussian). From the repository root:

    OMP_NUM_THREADS=1 python -m experiments.ncsn_techniques train --budget 600 presets   # 3 runs, 2 at a time
    OMP_NUM_THREADS=1 python -m experiments.ncsn_techniques train --budget 600 ablation  # 5 more
    OMP_NUM_THREADS=1 python -m experiments.ncsn_techniques report                       # tables, figures
    OMP_NUM_THREADS=1 python -m experiments.ncsn_techniques langevin                     # technique 4

Equal time on a shared machine: wall-clock time depends on what else runs, so every run gets the same
*process CPU seconds* of one thread. `train` first measures each configuration's CPU seconds per training
step (time.process_time, the configurations interleaved in one process), gives each the number of epochs
that fills --budget seconds, and records the CPU seconds each run really used (its rusage) in
runs/ncsn_techniques.json. All numbers are CPU-scale, on the JPEG copy of CIFAR-10.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import common
import ncsn

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "runs" / "ncsn_techniques.json"
DATA = ["--data", str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"), "--data-root", str(ROOT / "data")]
SMALL = ["--width", "32", "--channel-mult", "1,2,2", "--num-res-blocks", "1", "--batch-size", "64",
         "--limit-train", "6400", "--limit-test", "500", "--preview-levels", "10", "--log-every", "20",
         "--device", "cpu"]
CONFIGS = {  # name -> (flags on top of DATA + SMALL, what the row changes)
    "ncsnv2": ([], "NCSNv2's setting (the default preset)"),
    "ncsn2019": (["--preset", "ncsn2019"], "NCSN 2019's setting (--preset ncsn2019)"),
    "ncsnv2-lr1e-3": (["--lr", "1e-3"], "NCSNv2 at the 2019 lr 1e-3"),
}
ABLATION_BASE = ["--lr", "1e-3"]  # chosen after the first three runs: see README
CONFIGS.update({
    "ncsnv2-lr1e-3-seed2": ([*ABLATION_BASE, "--seed", "2"], "the same, another seed (seed-to-seed spread)"),
    "sigma1-1": ([*ABLATION_BASE, "--sigma-max", "1"], "technique 1 off: sigma_1 = 1 (232 levels 1 -> 0.01)"),
    "L10": ([*ABLATION_BASE, "--num-scales", "10"], "technique 2 off: L = 10 levels 50 -> 0.01"),
    "embed": ([*ABLATION_BASE, "--score-param", "embed"], "technique 3 off: s = f(x, sigma), no division"),
    "no-ema": ([*ABLATION_BASE, "--ema", "0"], "technique 5 off: no EMA"),
})
GROUPS = {"presets": ["ncsnv2", "ncsn2019", "ncsnv2-lr1e-3"],
          "ablation": ["ncsnv2-lr1e-3-seed2", "sigma1-1", "L10", "embed", "no-ema"]}
LADDER_2019 = ncsn.geometric_sigmas(1.0, 0.01, 10).tolist()  # NCSN 2019's levels: its network knows only these
TEST_SIGMAS = (*LADDER_2019[::-2], 1.0, 3.0, 10.0, 50.0)  # 0.01, 0.0278, 0.0774, 0.215, 0.599: its rungs


def argv_of(name):
    return [*DATA, *SMALL, "--name", f"techniques-{name}", *CONFIGS[name][0]]


def cpu_seconds_per_step(names, steps=6, rounds=3):
    """Median process CPU seconds of one training step (train_step + EMA update) per configuration, measured
    in this process with the configurations interleaved, so that they share the same machine conditions."""
    torch.set_num_threads(1)
    setups = {}
    for name in names:
        args = ncsn.parse_args(argv_of(name))
        torch.manual_seed(0)
        net, ema, optimizer, scaler = ncsn.build(args, torch.device("cpu"))
        setups[name] = (args, net, ema, optimizer, scaler, ncsn.noise_levels(args))
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


def train(names, budget, parallel=2):
    """Each configuration for --budget CPU seconds (whole epochs of 100 steps), `parallel` at a time."""
    per_step = cpu_seconds_per_step(names)
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    queue = [(name, max(1, round(budget / (per_step[name] * 100)))) for name in names]
    running = {}
    while queue or running:
        while queue and len(running) < parallel:
            name, epochs = queue.pop(0)
            before = set((ROOT / "runs").glob(f"ncsn__techniques-{name}__*"))
            cmd = [sys.executable, str(ROOT / "ncsn.py"), *argv_of(name), "--epochs", str(epochs)]
            log = open(ROOT / "runs" / f"ncsn_techniques_{name}.log", "w")
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
            running[proc.pid] = (name, epochs, before, time.time(), " ".join(cmd[1:]))
            print(f"started {name}: {epochs} epochs ({per_step[name]:.2f} CPU s per step measured)", flush=True)
        pid, status, usage = os.wait4(-1, 0)  # the finished child's own rusage: its CPU seconds
        name, epochs, before, wall_start, cmd = running.pop(pid)
        new = sorted(set((ROOT / "runs").glob(f"ncsn__techniques-{name}__*")) - before)
        record[name] = {"run": str(new[-1].relative_to(ROOT)) if new else None, "exit_status": status,
                        "epochs": epochs, "steps": epochs * 100, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                        "wall_seconds": time.time() - wall_start, "cpu_seconds_per_step_measured": per_step[name],
                        "command": f"OMP_NUM_THREADS=1 python {cmd}"}
        RECORD.write_text(json.dumps(record, indent=2))
        print(f"finished {name}: exit {status}, {record[name]['cpu_seconds']:.0f} CPU s, "
              f"{record[name]['wall_seconds']:.0f} s wall", flush=True)


def load_run(run, *extra):
    """(args, EMA network) of a finished run, on the CPU; `extra` flags choose its sampler."""
    args = ncsn.parse_args(["--sample", str(run), "--device", "cpu", *extra])
    return args, ncsn.load_trained(run, args, torch.device("cpu"))


def per_sigma_losses(record, names):
    """Each run's test DSM loss at TEST_SIGMAS (EMA weights, 500 test images, the same noise for every run)."""
    test = common.load_images(DATA[1], DATA[3], "test")[:500]
    for name in names:
        if list(record[name].get("test_dsm_at_sigma", {})) != [f"{s:.3g}" for s in TEST_SIGMAS]:
            _, net = load_run(ROOT / record[name]["run"])
            losses = ncsn.dsm_per_sigma(net, test, TEST_SIGMAS, torch.device("cpu"), None)
            record[name]["test_dsm_at_sigma"] = {f"{k:.3g}": v for k, v in losses.items()}
            RECORD.write_text(json.dumps(record, indent=2))
    return {name: list(record[name]["test_dsm_at_sigma"].values()) for name in names}


def markdown_table(record, losses, names):
    head = ("| run | " + " | ".join(f"sigma {s:.3g}" for s in TEST_SIGMAS) + " | steps | CPU s |\n|"
            + "---|" * (len(TEST_SIGMAS) + 3) + "\n")
    rows = "".join(f"| {CONFIGS[n][1]} | " + " | ".join(f"{v:.1f}" for v in losses[n])
                   + f" | {record[n]['steps']} | {record[n]['cpu_seconds']:.0f} |\n" for n in names)
    return head + rows + "| a zero score (D/2) | " + " | ".join(["1536.0"] * len(TEST_SIGMAS)) + " | | |\n"


def between_rungs(record, names=("ncsn2019", "L10", "ncsnv2-lr1e-3", "embed")):
    """How well each network knows the sigmas it was not trained at: the test DSM halfway (geometric mean)
    between two neighbouring levels of its ladder, against the geometric mean of the losses at the two levels
    (the loss changes smoothly with sigma), over up to ten pairs spread over [0.01, 1]."""
    test = common.load_images(DATA[1], DATA[3], "test")[:500]
    lines = ["| run | s = | levels | loss at its levels (mean) | halfway between (mean) | halfway / expected, "
             "mean (max) |", "|" + "---|" * 6]
    for name in [n for n in names if n in record and record[n]["run"]]:
        args, net = load_run(ROOT / record[name]["run"])
        inside = ncsn.noise_levels(args)
        inside = inside[inside <= 1.0 + 1e-6]
        pick = torch.linspace(0, len(inside) - 2, min(10, len(inside) - 1)).round().long()
        upper, lower = inside[pick], inside[pick + 1]
        at_upper, at_lower, halfway = (torch.tensor(list(ncsn.dsm_per_sigma(
            net, test, sigmas.tolist(), torch.device("cpu"), None).values())) for sigmas in
            (upper, lower, (upper * lower).sqrt()))
        ratio = halfway / (at_upper * at_lower).sqrt()
        param = "f(x, sigma) / sigma" if args.score_param == "divide" else "f(x, sigma)"
        lines.append(f"| {CONFIGS[name][1]} | {param} | {args.num_scales} | {at_upper.mean():.1f} | "
                     f"{halfway.mean():.1f} | {ratio.mean():.2f} ({ratio.max():.2f}) |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


@torch.inference_mode()
def sample_rows(record, names, n=8):
    """Each run's samples from the same start: the probability-flow ODE on the run's own levels (one Heun step
    between neighbours: cheap, and the same sampler for every run), and the two presets with their own annealed
    Langevin sampler (paper settings)."""
    rows = []
    for name in names:
        run = ROOT / record[name]["run"]
        _, net = load_run(run)
        for extra in (["--sampler", "ode"], []) if name in ("ncsnv2", "ncsn2019") else (
                ["--sampler", "ode"],):
            args = ncsn.parse_args(["--sample", str(run), "--device", "cpu", "--sample-batch", str(n), *extra])
            start = time.process_time()
            x, _ = ncsn.draw_samples(net, n, args, torch.device("cpu"), None, seed=0)
            settings = ncsn.sampler_settings(args, torch.device("cpu"))
            rows.append((f"{name}: {ncsn.SAMPLER_NAMES[args.sampler]}, {settings['nfe']} NFE "
                         f"({(time.process_time() - start) / n:.1f} CPU s each)", x))
            print(rows[-1][0], flush=True)
    return rows


def report():
    """Tables (printed, and runs/ncsn_techniques.md), the per-sigma figure and the sample grids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.set_num_threads(1)
    record = json.loads(RECORD.read_text())
    names = [n for n in CONFIGS if n in record and record[n]["run"]]
    losses = per_sigma_losses(record, names)
    presets = [n for n in GROUPS["presets"] if n in names]
    ablation = ["ncsnv2-lr1e-3", *[n for n in GROUPS["ablation"] if n in names]]
    text = ("Test DSM loss at fixed sigmas (500 JPEG-copy test images, EMA weights, the same noise for every run; "
            "CPU-scale):\n\n" + markdown_table(record, losses, presets) + "\nAblation:\n\n"
            + markdown_table(record, losses, ablation) + "\nBetween the levels:\n\n" + between_rungs(record))
    (ROOT / "runs" / "ncsn_techniques.md").write_text(text)
    print(text)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name in presets:
        axes[0].plot(TEST_SIGMAS, losses[name], "o-", label=CONFIGS[name][1])
    axes[0].axhline(1536, color="gray", ls=":", lw=1, label="a zero score (D/2)")
    axes[0].set(xscale="log", yscale="log", xlabel="sigma", ylabel="test DSM loss",
                title="the two papers' settings at equal CPU time")
    base = losses["ncsnv2-lr1e-3"]
    for name in ablation[1:]:
        axes[1].plot(TEST_SIGMAS, [v / b for v, b in zip(losses[name], base)], "o-", label=CONFIGS[name][1])
    axes[1].axhline(1, color="k", lw=1)
    axes[1].set(xscale="log", yscale="log", xlabel="sigma", ylabel="test DSM / NCSNv2 at lr 1e-3",
                title="one technique off at a time (above 1: worse)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle("NCSN on the JPEG copy of CIFAR-10, CPU-scale (width 32, ~10 CPU minutes per run)")
    fig.tight_layout()
    fig.savefig(ROOT / "runs" / "figures" / "ncsn_techniques.png", dpi=90)
    plt.close(fig)
    common.save_rows(sample_rows(record, presets + ablation[1:]), ROOT / "runs" / "figures" /
                     "ncsn_techniques_samples.png", title="samples from each run (values clamped to [0, 1])")


def langevin(n=2000):
    """Technique 4 where the answer is known: annealed Langevin with the exact score of a Gaussian with
    CIFAR-10's spectrum (experiments.ncsn_samplers), started from a draw of p_sigma_1: the final spread
    (before denoising) against the truth and against both predictions of ncsn.langevin_variance_ratio, for
    the paper's (T, eps) and worse ones."""
    from experiments.ncsn_samplers import cifar_spectrum, gaussian_problem

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    score, exact_sample, errors = gaussian_problem(n, g, cifar_spectrum(DATA[1], DATA[3]))
    eps_v2 = ncsn.technique4_eps(ncsn.geometric_sigmas(50, 0.01, 232), 5)
    eps_t1 = ncsn.technique4_eps(ncsn.geometric_sigmas(50, 0.01, 232), 1)
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
    lines = ["| setting | NFE | std ratio predicted, NCSNv2's formula | predicted, carried over | measured, "
             "directions below sigma_L | measured, 30 widest | KL per dim |", "|" + "---|" * 7]
    for what, sigma_max, levels, steps, eps in settings:
        sigmas = ncsn.geometric_sigmas(sigma_max, 0.01, levels)
        gamma = (sigmas[0] / sigmas[1]).item()
        stable = gamma**2 * (1 - eps / 0.01**2) ** (2 * steps) < 1
        predicted = [ncsn.langevin_variance_ratio(eps, steps, gamma, 0.01, c) ** 0.5 for c in (False, True)]
        with torch.no_grad():
            start = exact_sample() + sigma_max * torch.randn(n, 3072, generator=g)  # a draw of p_sigma_1
            x, _ = ncsn.annealed_langevin(score, start, sigmas, steps, eps, denoise=False, generator=g)
        e = errors(x)
        lines.append(f"| {what} | {levels * steps:,} | {predicted[0]:.3f} | "
                     f"{predicted[1]:.3f} | {e['spread_tight']:.3f} | {e['spread_wide']:.3f} | {e['kl_per_dim']:.4f} |"
                     if stable else f"| {what} | {levels * steps:,} | {predicted[0]:.3f} | grows without bound | "
                     f"{e['spread_tight']:.3f} | {e['spread_wide']:.3f} | {e['kl_per_dim']:.4f} |")
        print(lines[-1], flush=True)
    (ROOT / "runs" / "ncsn_technique4.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a group of configurations at equal CPU time")
    t.add_argument("group", choices=GROUPS)
    t.add_argument("--budget", type=float, default=600, help="CPU seconds of one thread per run")
    sub.add_parser("report", help="per-sigma test DSM tables, figure and sample grids from the runs")
    sub.add_parser("langevin", help="technique 4: (T, eps) on the exact score of a Gaussian")
    args = p.parse_args(argv)
    if args.command == "train":
        train(GROUPS[args.group], args.budget)
    elif args.command == "report":
        report()
    else:
        langevin()


if __name__ == "__main__":
    main()
