"""Annealed Langevin, predictor-corrector and the probability-flow ODE: error against network
evaluations.

Makes experiments/README.md's sampler table, experiments/results/ncsn_samplers.json and
runs/figures/ncsn_samplers.png (error against network evaluations per sample, NFE, on two problems
whose score is exact) and, with --run, runs/figures/ncsn_samplers_demo.png (the same samplers on a
trained CPU demo model, with CPU seconds per sample). ncsn.py has annealed Langevin (ald) and the
ODE (ode); the predictor-corrector sampler of Song et al. 2021 (pc) lives here. From the repository
root:

    OMP_NUM_THREADS=1 python -m experiments.ncsn_samplers
    # then the demo model (adds to the JSON)
    OMP_NUM_THREADS=1 python -m experiments.ncsn_samplers --run runs/RUN

The two exact-score problems, each sampled from sigma_1 down to sigma_L = 0.01 without the final
denoising step, so that the target is p_sigma_L (the data blurred by sigma_L) and every error is a
sampler's:
- mixture: NCSN's 2-D toy, 0.8 N((5,5), I) + 0.2 N((-5,-5), I) (toys.toy_data), sigma_1 = 20;
  errors: |weight of the first mode - 0.8|, |spread within the modes / the truth - 1|, the sliced
  1-Wasserstein distance to the exact p_sigma_L (16 directions; the projections' exact CDFs are
  mixtures of normal CDFs).
- gaussian: N(0.5, diag(lambda)) in 3,072 dimensions, lambda the eigenvalues of the covariance of
  10,000 JPEG-copy training images (CIFAR-10's spectrum: standard deviations from 7.6 down to
  0.001), sigma_1 = 50; the samplers treat every direction alike, so the diagonal basis loses
  nothing. Error: the mean over the dimensions of KL(fitted N(mean, std^2) ||
  exact N(0.5, lambda + sigma_L^2)), in nats.
Every sampler starts from an exact draw of p_sigma_1 (data + sigma_1 z), so that its error is its
own and not its start's: the ODE cannot correct a start that misses p_sigma_1 (uniform noise +
sigma_1 z on the mixture at sigma_1 = 20 moves 6% of the weight between the modes). The floor row is
the error of as many exact samples (sampling noise). The reference is annealed Langevin
with NCSNv2's own settings (L = 232, T = 5: 1,160 evaluations here, without the denoising step) and
ncsn.py's eps: the paper's 6.2e-6 on the paper's ladder (the gaussian's, from 50), and technique 4's
rule on the mixture's (from 20), 1.09e-5.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

import common
import ncsn
from experiments import ncsn_toy, toys

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "runs" / "figures"
RECORD = ROOT / "experiments" / "results" / "ncsn_samplers.json"
NFES = {"ald": (1160, 580, 230, 115, 55, 30), "pc": (1160, 464, 232, 116, 58, 30),
        "ode": (232, 116, 58, 30, 16, 8)}
NAMES = {"ald": "annealed Langevin", "pc": "predictor-corrector", "ode": "probability-flow ODE"}


def mixture_problem(n, g):
    """The toy mixture: (score, exact samples of p_sigma_L, error function)."""
    means, sigma_min = torch.tensor(toys.MIXTURE_MEANS), 0.01
    angles = torch.arange(16) * math.pi / 16
    directions = torch.stack([angles.cos(), angles.sin()], 1)  # (16, 2) unit vectors
    grid = torch.linspace(-16, 16, 4001)

    def sliced_w1(x):
        """Mean over directions of the integral of |empirical CDF - exact CDF| of the
        projections."""
        total = 0.0
        for w in directions:
            proj = (x @ w).sort().values
            empirical = torch.searchsorted(proj, grid).double() / len(x)
            exact = sum(weight * torch.distributions.Normal(
                            float(m @ w), math.sqrt(toys.MIXTURE_STD**2 + sigma_min**2)
                        ).cdf(grid.double())
                        for weight, m in zip(toys.MIXTURE_WEIGHTS, means))
            total += torch.trapezoid((empirical - exact).abs(), grid.double()).item()
        return total / len(directions)

    def errors(x):
        first = (x.sum(1) > 0)
        centre = torch.where(first[:, None], means[0], means[1])
        spread = ((x - centre).pow(2).mean() / (toys.MIXTURE_STD**2 + sigma_min**2)).sqrt().item()
        return {"weight_error": abs(first.float().mean().item() - toys.MIXTURE_WEIGHTS[0]),
                "spread_error": abs(spread - 1), "sliced_w1": sliced_w1(x)}

    def exact_sample():
        return toys.toy_data("mixture", n, g) + sigma_min * torch.randn(n, 2, generator=g)

    return ncsn_toy.exact_mixture_score, exact_sample, errors


def cifar_spectrum(data, data_root, n=10_000):
    """Eigenvalues of the covariance of n training images as [0, 1] vectors (3,072 numbers,
    descending)."""
    x = common.load_images(data, data_root, "train")[:n].flatten(1).double() / 255
    x = x - x.mean(0)
    return torch.linalg.eigvalsh(x.T @ x / (len(x) - 1)).flip(0).clamp(min=1e-8).float()


def gaussian_problem(n, g, variances):
    sigma_min, mu = 0.01, 0.5
    target_var = variances + sigma_min**2

    def score(x, sigma):
        return -(x - mu) / (variances + sigma.view(-1, 1) ** 2)

    def errors(x):
        m, v = x.mean(0), x.var(0)
        kl = 0.5 * (v / target_var + (m - mu) ** 2 / target_var - 1 - (v / target_var).log())
        ratio = (v / target_var).sqrt()
        tight = variances < sigma_min**2
        # std below sigma_L / the 30 widest directions
        return {"kl_per_dim": kl.mean().item(), "spread_tight": ratio[tight].mean().item(),
                "spread_wide": ratio[:30].mean().item()}

    return (score, lambda: mu + target_var.sqrt() * torch.randn(n, len(variances), generator=g),
            errors)


def predictor_corrector(score_net, x, sigmas, snr=0.16, denoise=True):
    """Predictor-corrector sampling of the variance-exploding SDE (Song et al. 2021, Alg. 2 and 4).
    At each level a Langevin *corrector* step of size 2 (snr |z| / |s|)^2 (the norms averaged over
    the batch, as the official code: per sample, a chain where s ~ 0 jumps), then the *predictor*, a
    reverse-SDE step to the next level: x + (sigma_i^2 - sigma_i+1^2) s + sqrt(sigma_i^2 -
    sigma_i+1^2) z. Costs 2 len(sigmas) - 1 (+ 1 to denoise) network evaluations."""
    for i, sigma in enumerate(sigmas):
        score, z = score_net(x, sigma.expand(len(x))).float(), torch.randn_like(x)
        step = 2 * (snr * z.flatten(1).norm(dim=1).mean()
                    / score.flatten(1).norm(dim=1).mean()) ** 2
        x = x + step * score + (2 * step).sqrt() * z
        if i + 1 < len(sigmas):
            variance = sigma**2 - sigmas[i + 1] ** 2  # the noise this step removes
            score = score_net(x, sigma.expand(len(x))).float()
            x = x + variance * score + variance.sqrt() * torch.randn_like(x)
    return ncsn.finish(score_net, x, sigmas[-1], denoise)


def settings(sampler, sigma_max, nfe=None, num_scales=232):
    """(sampler, sigmas, steps, eps, network evaluations) as ncsn.py picks them for a budget
    (without one: the run's own L levels), without the final denoising step; pc: (nfe + 1) / 2
    levels spaced as ncsn.py spaces the ODE's."""
    pick = [] if nfe is None or sampler == "pc" else ["--nfe", str(nfe)]
    args = ncsn.parse_args(["--sampler", "ald" if sampler == "ald" else "ode", "--sigma-max",
                            str(sigma_max), "--num-scales", str(num_scales), "--no-denoise", *pick])
    sigmas, steps, eps = ncsn.sampler_levels(args)
    if sampler == "pc" and nfe is not None:
        sigmas = ncsn.geometric_sigmas(sigma_max, args.sigma_min, (nfe + 1) // 2)
    cost = 2 * len(sigmas) - 1 if sampler == "pc" else \
        ncsn.network_evaluations(sampler, len(sigmas), steps, denoise=False)
    return sampler, sigmas, steps, eps, cost


@torch.no_grad()
def run(score, x, plan):
    """The sampler from x, a draw of p_sigma_1 itself (ncsn.py's Gaussian start only matches its
    first two moments)."""
    sampler, sigmas, steps, eps, _ = plan
    if sampler == "ald":
        return ncsn.annealed_langevin(score, x, sigmas, steps, eps, False)
    if sampler == "pc":
        return predictor_corrector(score, x, sigmas, denoise=False)
    return ncsn.probability_flow(score, x, sigmas, False)


def measure(problem, sigma_max, g):
    score, exact_sample, errors = problem
    exact = exact_sample()
    # p_sigma_1
    start = lambda: exact_sample() + sigma_max * torch.randn(exact.shape, generator=g)  # noqa: E731
    rows = [{"sampler": "exact samples (floor)", "nfe": 0, **errors(exact)}]
    plan = settings("ald", sigma_max)  # NCSNv2's own
    rows.append({"sampler": "ald, NCSNv2's L = 232, T = 5 (eps: ncsn.py's)", "nfe": plan[-1],
                 "eps": plan[3], **errors(run(score, start(), plan))})
    for sampler, budgets in NFES.items():
        for nfe in budgets:
            plan = settings(sampler, sigma_max, nfe)
            rows.append({"sampler": sampler, "nfe": plan[-1], "levels": len(plan[1]),
                         "eps": plan[3] if sampler == "ald" else None,
                         **errors(run(score, start(), plan))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def target_met(rows, key):
    """Samplers at <= 232 evaluations whose error is at most annealed Langevin's at NCSNv2's
    1,160."""
    reference = rows[1][key]
    return (reference,
            sorted({r["sampler"] for r in rows[2:] if r["nfe"] <= 232 and r[key] <= reference}))


def table(name, rows, keys):
    head = f"| {name} | NFE | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 2) + "\n"
    return head + "".join(f"| {r['sampler']} | {r['nfe']:,} | "
                          + " | ".join(f"{r[k]:.4f}" for k in keys) + " |\n" for r in rows)


def figure(results, path):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, key, label) in zip(axes, (
            ("mixture", "sliced_w1", "sliced W1 to the exact p_sigma_L"),
            ("gaussian", "kl_per_dim", "KL per dimension (nats)"))):
        rows = results[name]
        for sampler, style in (("ald", "o-"), ("pc", "s-"), ("ode", "^-")):
            pts = [(r["nfe"], r[key]) for r in rows if r["sampler"] == sampler]
            ax.plot(*zip(*pts), style, label=NAMES[sampler])
        ax.axhline(rows[1][key], color="k", ls="--", lw=1,
                   label="annealed Langevin, NCSNv2 (1,160)")
        ax.axhline(rows[0][key], color="gray", ls=":", lw=1, label="exact samples (sampling noise)")
        ax.axvline(232, color="gray", lw=0.5)
        ax.set(xscale="log", yscale="log", xlabel="network evaluations per sample",
               ylabel=label, title=name)
    axes[0].legend(fontsize=7)
    fig.suptitle("Samplers with the exact score (no network): error against network evaluations "
                 "per sample")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def demo(run, n=16):
    """The samplers on a trained run: CPU seconds per sample (one thread) and a grid row each."""
    torch.set_num_threads(1)
    rows, images, cpu = [], [], torch.device("cpu")
    net, stats = ncsn.load_trained(run, ncsn.parse_args(["--sample", run, "--device", "cpu"]), cpu)
    for sampler, nfe in (("ald", None), ("ald", 100), ("pc", 100), ("ode", 100), ("ode", 30)):
        args = ncsn.parse_args(["--sample", run, "--device", "cpu", "--batch-size", str(n)])
        _, sigmas, steps, eps, cost = settings(sampler, args.sigma_max, nfe, args.num_scales)
        torch.manual_seed(0)
        start = time.process_time()
        x = ncsn.gaussian_start(stats, sigmas[0].item(), cpu)(n)
        with torch.no_grad():
            x = (ncsn.annealed_langevin(net, x, sigmas, steps, eps, args.denoise)
                 if sampler == "ald" else
                 predictor_corrector(net, x, sigmas, denoise=args.denoise) if sampler == "pc" else
                 ncsn.probability_flow(net, x, sigmas, args.denoise))
        seconds, cost = (time.process_time() - start) / n, cost + int(args.denoise)
        rows.append({"sampler": sampler, "nfe": cost, "cpu_seconds_per_sample": seconds,
                     "outside_0_1": ((x < 0) | (x > 1)).float().mean().item()})
        images.append((f"{sampler}, {cost} NFE, {seconds:.1f} s", x[:8]))
        print(json.dumps(rows[-1]), flush=True)
    common.save_rows(images, FIGURES / "ncsn_samplers_demo.png",
                     title=f"the samplers on {Path(run).name}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000,
                   help="samples for the mixture (the gaussian uses n / 5)")
    p.add_argument("--data", default="cifar10", help="CIFAR-10, or a folder copy of it")
    p.add_argument("--data-root", default=str(ROOT / "data"))
    p.add_argument("--run",
                   help="only the demo: the samplers on this trained run (CPU seconds per sample)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    record = RECORD
    record.parent.mkdir(parents=True, exist_ok=True)
    if args.run:  # the demo only, added to the exact-score results
        results = json.loads(record.read_text()) if record.exists() else {}
        results["demo"] = {"run": args.run, "rows": demo(args.run)}
        record.write_text(json.dumps(results, indent=2))
        return
    g = torch.Generator().manual_seed(0)
    start = time.process_time()
    results = {"mixture": measure(mixture_problem(args.n, g), 20.0, g),
               "gaussian": measure(gaussian_problem(args.n // 5, g,
                                                    cifar_spectrum(args.data, args.data_root)),
                                   50.0, g)}
    results["cpu_seconds"] = time.process_time() - start
    if record.exists() and "demo" in json.loads(record.read_text()):  # keep the demo model's rows
        results["demo"] = json.loads(record.read_text())["demo"]
    results["target"] = {f"{name} {key}": target_met(results[name], key)
                         for name, key in (("mixture", "weight_error"), ("mixture", "spread_error"),
                                           ("mixture", "sliced_w1"), ("gaussian", "kl_per_dim"))}
    FIGURES.mkdir(parents=True, exist_ok=True)
    figure(results, FIGURES / "ncsn_samplers.png")
    record.write_text(json.dumps(results, indent=2))
    print(table("mixture", results["mixture"], ["weight_error", "spread_error", "sliced_w1"]))
    print(table("gaussian", results["gaussian"], ["kl_per_dim", "spread_tight", "spread_wide"]))
    print(json.dumps(results["target"], indent=2), f"\n{results['cpu_seconds']:.0f} CPU seconds")


if __name__ == "__main__":
    main()
