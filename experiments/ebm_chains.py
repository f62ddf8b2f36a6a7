"""What persistent chains buy, on 2-D toys whose true density is known: the table "What persistent
chains buy" in experiments/README.md and its figure runs/figures/ebm_chains.png.

    OMP_NUM_THREADS=1 python -m experiments.ebm_chains              # 2 toys x 4 schemes x 3 seeds
    OMP_NUM_THREADS=1 python -m experiments.ebm_chains --iterations 30 --seeds 1 --out runs/chains_q

Every scheme trains experiments/ebm_toy.py's toy (`train_toy`: the same MLP energy, loss, Adam
and Langevin sampler at temperature 1, step eps / 2 and noise sqrt(eps), eps = 0.005) for the same
number of updates (3000) with the same number of negatives per update (128, the data batch). They
differ only in where each update's chains start and how many SGLD steps they run, so they differ in
cost:

    persistent-10    the replay buffer (10,000 chains, 5% restarted from uniform noise per draw:
                     IGEBM, and experiments/ebm_toy.py), 10 steps
    short-run-10     uniform noise over the box, 10 steps: the toy's sampler without its buffer
    persistent-100   the replay buffer, 100 steps
    short-run-100    uniform noise over the box, 100 steps: Nijkamp et al.'s short-run sampler as
                     far as the toy allows. Taken from them: K = 100 steps from noise over the
                     data's range, fresh chains every update, no buffer (enijkamp/short_run,
                     train_cifar10_minimal.py: K = 100 from U(-1, 1); point0bar1/ebm-anatomy,
                     config_locker/rings_nonconvergent.json: 100 steps from N(0, 2^2) on a rings
                     toy). Not taken: their noise of 0.01 per step with the temperature absorbed
                     into the scale of E (the toy keeps temperature 1 and eps = 0.005, noise 0.07
                     per step on a box of half-width 4: more noise for the data's size than
                     theirs, not less), and their Adam at lr 1e-4 for 1e5 updates (the toy keeps
                     5e-3 for 3000).

Measured on a grid over the box, with q = exp(-E) normalised on the grid and p the true density:
    tv              total variation distance between p and q (0 = equal, 1 = disjoint)
    weight_tv       "how heavy": total variation between the modes' relative masses under q and p
    off_mode        q's mass outside every mode (more than 4 std from a centre, or more than 0.5
                    from a ring's radius); p's is < 0.001
    origin          the part of off_mode within 0.5 of the origin, where p is about 0 on both toys
                    (a blob there is off-mode mass, not mass on a mode)
    shape_tv        "where and what shape": total variation between p and q once q's mass in every
                    mode (and outside them) is set to p's
    location_std    "where": distance between each mode's mean under q and under p, in mode stds
    covered         modes holding at least a quarter of their true relative mass under q
    samples_weight_tv, samples_off_mode   weight_tv and off_mode of the sampler's own output (the
                    replay buffer, or 2000 fresh chains of the training length): the negatives, as
                    opposed to what exp(-E) says. The row "data" gives them for 2000 true samples.
    samples_far     the share of those samples more than 3 std from every mode (a centre, or a
                    ring's circle): between the modes as well as outside them. On the rings the
                    mode regions tile the disc 0.5 < r < 3.5, so off_mode counts only the centre and
                    the outside; points between two rings count here. True samples: about 0.01
                    (8gaussians) and 0.003 (rings).
Costs: SGLD gradient evaluations (updates x chains x steps), CPU seconds of training on one thread.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the model files are scripts at the top of the repository

import torch  # noqa: E402

import common  # noqa: E402
import ebm  # noqa: E402
from experiments import toys  # noqa: E402
from experiments.ebm_toy import TOY, train_toy  # noqa: E402

SCHEMES = {  # name: (restart rate, SGLD steps); 128 negatives per update, TOY["iterations"] updates
    "persistent-10": (0.05, 10),
    "short-run-10": (1.0, 10),
    "persistent-100": (0.05, 100),
    "short-run-100": (1.0, 100),
}
TOYS = ("8gaussians", "rings")
STD = {"8gaussians": 0.15, "rings": 0.08}  # toys.toy_data's noise
ANGLES = torch.arange(8, dtype=torch.float64) * math.pi / 4
CENTRES = 2 * torch.stack([ANGLES.cos(), ANGLES.sin()], 1)  # 8gaussians' modes, radius 2
MEASURES = ("tv", "weight_tv", "off_mode", "origin", "shape_tv", "location_std", "covered",
            "samples_weight_tv", "samples_off_mode", "samples_far")


def grid(n):
    """Cell centres (n*n, 2) covering the toy box, and the cell area."""
    box = TOY["box"]
    step = 2 * box / n
    axis = -box + step * (torch.arange(n, dtype=torch.float64) + 0.5)
    return torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2), step**2


def true_density(name, points):
    """p(x) of toys.toy_data on the points, in closed form. A ring of radius k blurred by
    N(0, s^2 I) has density exp(-(r^2 + k^2) / 2s^2) I0(r k / s^2) / (2 pi s^2) at radius r
    (I0: the modified Bessel function, the angle's average of exp(r k cos(angle) / s^2))."""
    var = STD[name] ** 2
    if name == "8gaussians":
        sq = ((points[:, None] - CENTRES) ** 2).sum(-1) / var
        return (torch.exp(-sq / 2) / (2 * math.pi * var)).mean(1)
    radius = points.norm(dim=1)  # rings of radius 1, 2, 3, equally likely; i0e(x) = exp(-x) I0(x)
    rings = [torch.exp(-(radius - k) ** 2 / (2 * var)) * torch.special.i0e(radius * k / var)
             for k in (1, 2, 3)]
    return sum(rings) / (3 * 2 * math.pi * var)


def mode_regions(name, points):
    """The mode each point belongs to (0..K-1), or K for none; and the true mode weights (K,)."""
    if name == "8gaussians":  # within 4 std of one of the 8 centres
        dist = torch.cdist(points, CENTRES)
        nearest = dist.argmin(1)
        return torch.where(dist.min(1).values < 4 * STD[name], nearest, 8), torch.full((8,), 1 / 8)
    radius = points.norm(dim=1)  # rings: the nearest of radii 1, 2, 3, within 0.5
    ring = radius.round().long() - 1
    return torch.where((radius > 0.5) & (radius < 3.5), ring, 3), torch.full((3,), 1 / 3)


def compare(name, q, points):
    """The measures of the docstring for a density q (unnormalised, on the grid `points`) vs p."""
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
    return {"tv": 0.5 * (p - q).abs().sum().item(),
            "weight_tv": 0.5 * (q_modes - p_modes).abs().sum().item(),
            "off_mode": q_mass[k].item(), "origin": q[points.norm(dim=1) < 0.5].sum().item(),
            "shape_tv": 0.5 * (p - reweighted).abs().sum().item(),
            "location_std": sum(location) / k, "covered": int((q_modes >= p_modes / 4).sum()),
            "modes": k, "mode_weights": q_modes.tolist()}


def mode_distance(name, points):
    """Each point's distance to the nearest mode (a centre, or a ring's circle), in data stds."""
    if name == "8gaussians":
        return torch.cdist(points, CENTRES).min(1).values / STD[name]
    radius = points.norm(dim=1)
    return (radius - radius.round().clamp(1, 3)).abs() / STD[name]


def compare_samples(name, samples):
    """weight_tv and off_mode of a set of points (their shares in the modes and outside them all),
    and the share of them more than 3 std from every mode."""
    samples = samples.double()
    region, weights = mode_regions(name, samples)
    counts = torch.bincount(region, minlength=len(weights) + 1).double()
    in_modes = counts[:-1] / counts[:-1].sum().clamp(min=1)
    return {"samples_weight_tv": 0.5 * (in_modes - weights.double()).abs().sum().item(),
            "samples_off_mode": (counts[-1] / counts.sum()).item(),
            "samples_far": (mode_distance(name, samples) > 3).double().mean().item()}


def reference(name, seed, n_grid, n_samples=2000):
    """The row "data": p against itself (its own off-mode and origin mass) and n true samples, whose
    samples_weight_tv is the sampling noise of n points, the floor for every scheme's."""
    points, _ = grid(n_grid)
    data = toys.toy_data(name, n_samples, torch.Generator().manual_seed(seed))
    return {**compare(name, true_density(name, points), points), **compare_samples(name, data),
            "toy": name, "scheme": "data", "seed": seed, "samples": data}


def run(name, scheme, seed, iterations, n_grid, n_samples=2000):
    """Train one scheme, then measure exp(-E) on the grid and the sampler's output."""
    restart, steps = SCHEMES[scheme]
    chains = TOY["batch"]  # as many negatives as data points in every update
    start = time.process_time()
    net, buffer = train_toy(name, iterations, seed, steps, chains, restart_rate=restart)
    seconds = time.process_time() - start
    points, _ = grid(n_grid)
    with torch.no_grad():
        energy = net(points.float()).double()
    result = compare(name, torch.exp(-(energy - energy.min())), points)
    if restart < 1:  # persistent chains: the buffer is the sampler's output
        samples = buffer.samples[:n_samples]
    else:  # fresh chains from noise, as long as in training
        eps, box = TOY["eps"], TOY["box"]
        samples, _ = ebm.sgld(net, buffer.noise(n_samples, (2,), "cpu"), steps, eps / 2,
                              math.sqrt(eps), bounds=(-box, box))
    result.update(**compare_samples(name, samples), toy=name, scheme=scheme, seed=seed,
                  updates=iterations, steps=steps, chains=chains, restart_rate=restart,
                  sgld_evaluations=iterations * chains * steps, cpu_seconds=seconds)
    return result, energy.view(n_grid, n_grid), samples


def cell(values, key, modes):
    """mean +- std over seeds (the std only when there are several)."""
    values = torch.tensor(values, dtype=torch.float64)
    small = ("off_mode", "origin", "samples_off_mode", "samples_far")  # fractions near 0
    digits = 0 if key == "cpu_seconds" else 1 if key == "covered" else 3 if key in small else 2
    text = f"{values.mean().item():.{digits}f}"
    if len(values) > 1:
        text += f" +- {values.std().item():.{digits}f}"
    return text + (f" / {modes}" if key == "covered" else "")


def table(results):
    """Markdown: every measure and both costs, mean +- std over seeds, per toy and scheme."""
    keys = (*MEASURES, "cpu_seconds")
    lines = ["| toy | scheme | chains start | steps | SGLD evaluations | " + " | ".join(keys)
             + " |",
             "|---|---|---|---|---|" + "---|" * len(keys)]
    for name in dict.fromkeys(r["toy"] for r in results):
        for scheme in dict.fromkeys(r["scheme"] for r in results):
            rows = [r for r in results if r["toy"] == name and r["scheme"] == scheme]
            if not rows:
                continue
            first = rows[0]
            if scheme == "data":
                head = [name, f"data ({len(first['samples'])} true samples)", "-", "-", "-"]
                cells = [cell([r[k] for r in rows], k, first["modes"]) for k in MEASURES] + ["-"]
            else:
                start = "replay buffer" if first["restart_rate"] < 1 else "uniform noise"
                head = [name, scheme, start, str(first["steps"]),
                        f"{first['sgld_evaluations'] / 1e6:.2f}M"]
                cells = [cell([r[k] for r in rows], k, first["modes"]) for k in keys]
            lines.append("| " + " | ".join(head + cells) + " |")
    return "\n".join(lines)


def region_outlines(ax, name):
    """The mode regions' borders (dotted): mass outside them is off_mode."""
    import matplotlib.pyplot as plt

    if name == "8gaussians":
        outlines = [(x, y, 4 * STD[name]) for x, y in CENTRES.tolist()]
    else:
        outlines = [(0, 0, 0.5), (0, 0, 3.5)]
    for x, y, radius in outlines:
        ax.add_patch(plt.Circle((x, y), radius, fill=False, ls=":", lw=0.6, color="tab:red"))


def figure(panels, path):
    """Per toy, one row per scheme after the truth, two columns per seed: the density exp(-E) scaled
    to its maximum, and the sampler's output; each titled with its off-mode mass. Every seed is
    shown: a blob that only some seeds grow must not hide behind the first one."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    toys = list(dict.fromkeys(t for t, _, _ in panels))
    schemes = list(dict.fromkeys(s for _, s, _ in panels))
    seeds = list(dict.fromkeys(seed for _, _, seed in panels))
    box = TOY["box"]
    fig, axes = plt.subplots(len(toys) * len(schemes), 2 * len(seeds), squeeze=False,
                             figsize=(1.5 * 2 * len(seeds), 1.6 * len(toys) * len(schemes)))
    for t, name in enumerate(toys):
        for s, scheme in enumerate(schemes):
            row = t * len(schemes) + s
            for c, seed in enumerate(seeds):
                result, energy, samples = panels[name, scheme, seed]
                density, scatter = axes[row, 2 * c], axes[row, 2 * c + 1]
                density.imshow(torch.exp(-(energy - energy.min())).numpy(), cmap="viridis",
                               extent=(-box, box, -box, box), origin="lower")
                label = ("p", "data") if scheme == "data" else ("exp(-E)", "samples")
                density.set_title(f"seed {seed} {label[0]}: off {result['off_mode']:.2f}\n"
                                  f"origin {result['origin']:.2f}", fontsize=6)
                scatter.scatter(*samples[:1000].T, s=0.3, color="tab:orange")
                scatter.set_title(f"{label[1]}: off {result['samples_off_mode']:.2f}\n"
                                  f"far {result['samples_far']:.2f}", fontsize=6)
                for ax in (density, scatter):
                    region_outlines(ax, name)
                    ax.set_xlim(-box, box), ax.set_ylim(-box, box), ax.set_aspect("equal")
                    ax.set_xticks([]), ax.set_yticks([])
            axes[row, 0].set_ylabel(f"{name}\n{scheme}", fontsize=7)
    fig.suptitle("128 negatives per update, equal updates. Densities scaled to their maximum; "
                 "dotted: mode regions;\noff = off-mode mass (outside them), origin = its part "
                 "within 0.5 of the centre, far = share of samples > 3 std from every mode",
                 fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the two-line title
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=common.positive_int, default=TOY["iterations"],
                   help="updates per scheme (every scheme gets the same number)")
    p.add_argument("--seeds", type=common.positive_int, default=3, help="seeds 1..N per scheme")
    p.add_argument("--toys", default=",".join(TOYS), help="comma-separated: 8gaussians,rings")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated, see above")
    p.add_argument("--grid", type=common.positive_int, default=200, help="grid cells per side")
    p.add_argument("--out", default="experiments/results/ebm_chains",
                   help="folder for results.json and table.md")
    p.add_argument("--figure", default="runs/figures/ebm_chains.png", help="where the figure goes")
    args = p.parse_args(argv)
    args.toys, args.schemes = args.toys.split(","), args.schemes.split(",")
    unknown = [s for s in args.schemes if s not in SCHEMES]
    unknown += [t for t in args.toys if t not in TOYS]
    if unknown:
        p.error(f"unknown toy or scheme {unknown[0]!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    results, panels = [], {}
    for name in args.toys:
        for seed in range(1, args.seeds + 1):
            row = reference(name, seed, args.grid)
            results.append(row)
            points, _ = grid(args.grid)
            energy = -true_density(name, points).log().view(args.grid, args.grid)
            panels[name, "data", seed] = row, energy, row["samples"]
        for scheme in args.schemes:
            for seed in range(1, args.seeds + 1):
                result, energy, samples = run(name, scheme, seed, args.iterations, args.grid)
                results.append(result)
                panels[name, scheme, seed] = result, energy, samples
                print(f"{name} {scheme} seed {seed}: " + "  ".join(
                    f"{k} {result[k]:.3f}" for k in MEASURES) + f"  ({result['cpu_seconds']:.0f}"
                    f" CPU s, {result['sgld_evaluations']} SGLD evaluations)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = [{k: v for k, v in r.items() if k != "samples"} for r in results]
    (out / "results.json").write_text(json.dumps(saved, indent=2))
    markdown = table(results)
    (out / "table.md").write_text(markdown + "\n")
    figure(panels, Path(args.figure))
    print(markdown + f"\nwrote {out / 'results.json'}, {out / 'table.md'} and {args.figure}")
    return saved


if __name__ == "__main__":
    main()
