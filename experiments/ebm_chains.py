"""What persistent chains buy, on 2-D toys whose true density is known: README's table "Persistent vs
short-run chains" and its figure runs/figures/ebm_chains.png.

    OMP_NUM_THREADS=1 python -m experiments.ebm_chains                 # 2 toys x 5 chain schemes x 3 seeds
    OMP_NUM_THREADS=1 python -m experiments.ebm_chains --iterations 30 --seeds 1 --out /tmp/chains  # smoke run

Every scheme trains ebm.py's toy energy (same MLP, loss, Langevin sampler at temperature 1, optimiser) with the
same number of SGLD gradient evaluations: updates x chains x steps = 3000 x 128 x 10 = 3.84M. They differ only
in where the negatives' chains start and how long they run:

    persistent         replay buffer, 5% of chains restarted from noise per update (IGEBM; ebm.py --toy)
    short-run          every chain from uniform noise, 10 steps (Nijkamp et al. 2019)
    long-4x            every chain from noise, 40 steps, a quarter of the chains (same number of updates)
    long-16x           every chain from noise, 160 steps, 8 chains per update
    long-4x-fewer-updates  every chain from noise, 40 steps, 128 chains, a quarter of the updates

Measured on a grid over the box, with q = exp(-E) normalised on the grid and p the true density:
    tv              total variation distance between p and q (0 = equal, 1 = disjoint)
    weight_tv       "how heavy": total variation between the modes' relative masses under q and under p
    off_mode        q's mass outside every mode (within 4 std of a centre, or 0.5 of a ring); p's is < 0.001
    shape_tv        "where and what shape": total variation between p and q once q's mass in every mode (and
                    outside them) is set to p's
    location_std    "where": distance between each mode's mean under q and under p, in the mode's std
    covered         modes holding at least a quarter of their true relative mass under q
    samples_weight_tv, samples_off_mode   the same two for the sampler's own output (the replay buffer, or
                    fresh chains of the training length): the negatives, as opposed to what exp(-E) says
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

import common
import ebm

SCHEMES = {  # name: (SGLD steps, chains per update, updates as a fraction of TOY["iterations"], restart rate)
    "persistent": (10, 128, 1, 0.05),
    "short-run": (10, 128, 1, 1.0),
    "long-4x": (40, 32, 1, 1.0),
    "long-16x": (160, 8, 1, 1.0),
    "long-4x-fewer-updates": (40, 128, 1 / 4, 1.0),
}
TOYS = ("8gaussians", "rings")
STD = {"8gaussians": 0.15, "rings": 0.08}  # common.toy_data's noise


def grid(n):
    """Cell centres (n*n, 2) covering the toy box, and the cell area."""
    box = ebm.TOY["box"]
    step = 2 * box / n
    axis = -box + step * (torch.arange(n, dtype=torch.float64) + 0.5)
    return torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2), step**2


def true_density(name, points):
    """p(x) of common.toy_data on the given points, in closed form (8gaussians) or by quadrature over the angle."""
    if name == "8gaussians":
        angle = torch.arange(8, dtype=torch.float64) * math.pi / 4
        centres = 2 * torch.stack([angle.cos(), angle.sin()], 1)
        sq = ((points[:, None] - centres) ** 2).sum(-1) / STD[name] ** 2
        return (torch.exp(-sq / 2) / (2 * math.pi * STD[name] ** 2)).mean(1)
    angle = torch.linspace(0, 2 * math.pi, 1441, dtype=torch.float64)[:-1]  # radius k in {1, 2, 3}, angle uniform
    circle = torch.stack([angle.cos(), angle.sin()], 1)
    density = torch.zeros(len(points), dtype=torch.float64)
    for k in (1, 2, 3):
        for chunk, out in zip(points.split(4096), density.split(4096)):
            sq = ((chunk[:, None] - k * circle) ** 2).sum(-1) / STD[name] ** 2
            out += (torch.exp(-sq / 2) / (2 * math.pi * STD[name] ** 2)).mean(1) / 3
    return density


def mode_regions(name, points):
    """The mode each point belongs to (0..K-1), or K for none; and the true mode weights (K,)."""
    if name == "8gaussians":  # within 4 std of one of the 8 centres
        angle = torch.arange(8, dtype=torch.float64) * math.pi / 4
        dist = torch.cdist(points, 2 * torch.stack([angle.cos(), angle.sin()], 1))
        nearest = dist.argmin(1)
        return torch.where(dist.min(1).values < 4 * STD[name], nearest, 8), torch.full((8,), 1 / 8)
    radius = points.norm(dim=1)  # rings: the nearest of radii 1, 2, 3, within 0.5
    ring = radius.round().long() - 1
    return torch.where((radius > 0.5) & (radius < 3.5), ring, 3), torch.full((3,), 1 / 3)


def compare(name, q, points):
    """The measures of the module docstring for a density q (unnormalised, on the grid `points`) against p."""
    p = true_density(name, points)
    p, q = p / p.sum(), q.double() / q.sum()
    region, weights = mode_regions(name, points)
    k = len(weights)
    p_mass = torch.zeros(k + 1, dtype=torch.float64).index_add_(0, region, p)
    q_mass = torch.zeros(k + 1, dtype=torch.float64).index_add_(0, region, q)
    q_modes, p_modes = q_mass[:k] / q_mass[:k].sum(), p_mass[:k] / p_mass[:k].sum()
    reweighted = q * (p_mass / q_mass.clamp(min=1e-300))[region]  # q with p's mass in every region
    location = []
    for m in range(k):
        inside = region == m
        if name == "8gaussians":
            where = [(points[inside] * d[inside, None]).sum(0) / d[inside].sum() for d in (p, q)]
            location.append((where[0] - where[1]).norm().item() / STD[name])
        else:  # rings: the mean radius
            radius = points[inside].norm(dim=1)
            where = [(radius * d[inside]).sum() / d[inside].sum() for d in (p, q)]
            location.append(abs(where[0] - where[1]).item() / STD[name])
    return {"tv": 0.5 * (p - q).abs().sum().item(), "weight_tv": 0.5 * (q_modes - p_modes).abs().sum().item(),
            "shape_tv": 0.5 * (p - reweighted).abs().sum().item(), "location_std": sum(location) / k,
            "covered": int((q_modes >= p_modes / 4).sum()), "modes": k,
            "off_mode": q_mass[k].item(), "mode_weights": q_modes.tolist()}


def compare_samples(name, samples):
    """weight_tv and off_mode of a set of points: their shares in each mode, and outside every mode."""
    region, weights = mode_regions(name, samples.double())
    counts = torch.bincount(region, minlength=len(weights) + 1).double()
    in_modes = counts[:-1] / counts[:-1].sum().clamp(min=1)
    return {"samples_weight_tv": 0.5 * (in_modes - weights.double()).abs().sum().item(),
            "samples_off_mode": (counts[-1] / counts.sum()).item()}


def run(name, scheme, seed, iterations, n_grid):
    steps, chains, fraction, restart = SCHEMES[scheme]
    updates = max(1, round(iterations * fraction))
    start = time.process_time()
    net, buffer = ebm.train_toy(name, updates, seed, steps=steps, chains=chains, restart_rate=restart)
    seconds = time.process_time() - start
    points, _ = grid(n_grid)
    with torch.no_grad():
        energy = net(points.float()).double()
    result = compare(name, torch.exp(-(energy - energy.min())), points)
    if restart < 1:  # persistent chains: the buffer is the sampler's output
        samples = buffer.samples[:2000]
    else:  # fresh chains from noise, as long as in training
        samples, _, _ = ebm.sgld(net, buffer.noise(2000, (2,), "cpu"), steps, ebm.TOY["eps"] / 2,
                                 math.sqrt(ebm.TOY["eps"]), bounds=(-ebm.TOY["box"], ebm.TOY["box"]))
    result.update(**compare_samples(name, samples), toy=name, scheme=scheme, seed=seed,
                  updates=updates, steps=steps, chains=chains, sgld_evaluations=updates * chains * steps,
                  cpu_seconds=seconds)
    return result, energy.view(n_grid, n_grid)


def table(results):
    """Markdown: mean +- std over seeds per toy and scheme."""
    keys = ("tv", "weight_tv", "off_mode", "shape_tv", "location_std", "covered", "samples_weight_tv",
            "samples_off_mode", "cpu_seconds")
    lines = ["| toy | scheme | steps x chains x updates | " + " | ".join(keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for name in dict.fromkeys(r["toy"] for r in results):
        for scheme in dict.fromkeys(r["scheme"] for r in results):
            rows = [r for r in results if r["toy"] == name and r["scheme"] == scheme]
            if not rows:
                continue
            cells = []
            for key in keys:
                values = torch.tensor([float(r[key]) for r in rows])
                if key == "cpu_seconds":  # training only, one thread: equal evaluations are not equal time
                    cells.append(f"{values.mean().item():.0f}")
                    continue
                spread = f" +- {values.std().item():.2f}" if len(rows) > 1 else ""
                cells.append(f"{values.mean().item():.2f}{spread}" + (f" / {rows[0]['modes']}" if key == "covered"
                                                                       else ""))
            r = rows[0]
            lines.append(f"| {name} | {scheme} | {r['steps']} x {r['chains']} x {r['updates']} | " + " | ".join(cells)
                         + " |")
    return "\n".join(lines)


def figure(energies, path, n_grid):
    """Two rows per toy, one column per scheme (first seed) after the true density: the density exp(-E) scaled to
    its maximum (how heavy), and the log density -E over its top 15 nats (where)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    toys = list(dict.fromkeys(t for t, _ in energies))
    schemes = list(dict.fromkeys(s for _, s in energies))
    box = ebm.TOY["box"]
    fig, axes = plt.subplots(2 * len(toys), len(schemes) + 1, figsize=(1.9 * (len(schemes) + 1), 3.9 * len(toys)),
                             squeeze=False)
    points, _ = grid(n_grid)
    for t, name in enumerate(toys):
        log_p = true_density(name, points).log().view(n_grid, n_grid)
        panels = [("true", -log_p)] + [(s, energies[name, s]) for s in schemes]
        for column, (title, energy) in enumerate(panels):
            log_q = -(energy - energy.min())  # 0 at the highest density
            for row, image in ((2 * t, log_q.exp()), (2 * t + 1, log_q.clamp(min=-15))):
                ax = axes[row, column]
                ax.imshow(image.numpy(), extent=(-box, box, -box, box), origin="lower", cmap="viridis")
                ax.set_xticks([]), ax.set_yticks([])
                if row == 2 * t:
                    ax.set_title(title, fontsize=8)
        axes[2 * t, 0].set_ylabel(f"{name}: density", fontsize=8)
        axes[2 * t + 1, 0].set_ylabel(f"{name}: log density", fontsize=8)
    fig.suptitle("learned with the same number of SGLD gradient evaluations (first seed)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=common.positive_int, default=ebm.TOY["iterations"],
                   help="updates of the schemes with the full number of updates")
    p.add_argument("--seeds", type=common.positive_int, default=3, help="seeds 1..N per toy and scheme")
    p.add_argument("--toys", default=",".join(TOYS), help="comma-separated: 8gaussians,rings")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated names from the docstring")
    p.add_argument("--grid", type=common.positive_int, default=200, help="grid cells per side")
    p.add_argument("--out", default="runs/ebm_chains", help="folder for results.json and table.md")
    p.add_argument("--figure", default="runs/figures/ebm_chains.png", help="where the figure goes")
    args = p.parse_args(argv)
    toys, schemes = args.toys.split(","), args.schemes.split(",")
    unknown = [s for s in schemes if s not in SCHEMES] + [t for t in toys if t not in TOYS]
    if unknown:
        p.error(f"unknown toy or scheme {unknown[0]!r}")
    torch.set_num_threads(1)
    results, energies = [], {}
    for name in toys:
        for scheme in schemes:
            for seed in range(1, args.seeds + 1):
                result, energy = run(name, scheme, seed, args.iterations, args.grid)
                results.append(result)
                energies.setdefault((name, scheme), energy)
                print(f"{name:10s} {scheme:22s} seed {seed}: tv {result['tv']:.3f}  weight_tv {result['weight_tv']:.3f}"
                      f"  shape_tv {result['shape_tv']:.3f}  location {result['location_std']:.2f} std  covered "
                      f"{result['covered']}/{result['modes']}  ({result['cpu_seconds']:.0f} CPU s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    markdown = table(results)
    (out / "table.md").write_text(markdown + "\n")
    figure(energies, Path(args.figure), args.grid)
    print(markdown + f"\nwrote {out / 'results.json'}, {out / 'table.md'} and {args.figure}")
    return results


if __name__ == "__main__":
    main()
