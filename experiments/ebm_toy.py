"""ebm.py's loss, sampler and replay buffer on a 2-D toy, where the density is known: a minute on a
laptop.

    python -m experiments.ebm_toy               # 8gaussians: runs/ebm-toy__.../toy.png and toy.json
    python -m experiments.ebm_toy --data rings  # three rings

An MLP energy trained by the same contrastive divergence, SGLD and replay buffer as the image model,
but with the sampler at temperature 1: step eps/2 and noise sqrt(eps) in Langevin's proportion and
no clipping, so that exp(-E) itself is the density learned. A small alpha lets energies span the ~15
nats between a mode and the gap beside it. The figure shows the data, exp(-E), -E, and the buffer's
samples: contrastive divergence learns where the modes are far better than how heavy they are
(experiments/ebm_chains.py measures it).
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
import torch.nn as nn  # noqa: E402

import common  # noqa: E402
import ebm  # noqa: E402
from experiments import toys  # noqa: E402

TOY = {"hidden": 128, "iterations": 3000, "batch": 128, "steps": 10, "eps": 0.005, "alpha": 0.001,
       "lr": 5e-3, "box": 4.0}


def toy_energy_net(hidden=128):
    """The toy's energy: an MLP (B, 2) -> (B,), smooth (SiLU) for the same reason as the image
    net."""
    return nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, 1), nn.Flatten(0))


def train_toy(name, iterations=None, seed=1, steps=None, chains=None, restart_rate=0.05):
    """The toy energy and its replay buffer. steps and chains (SGLD steps, negatives per update)
    default to TOY's; restart_rate 1 starts every chain from noise: short-run chains (Nijkamp et al.
    2019) instead of persistent ones."""
    torch.manual_seed(seed)
    g, box = torch.Generator().manual_seed(seed), TOY["box"]
    net = toy_energy_net(TOY["hidden"])
    optimizer = torch.optim.Adam(net.parameters(), lr=TOY["lr"], betas=(0.0, 0.999))
    buffer = ebm.ReplayBuffer(10000, (2,), "cpu", restart_rate, low=-box, high=box)
    for _ in range(iterations or TOY["iterations"]):
        x_neg, idx = buffer.sample(chains or TOY["batch"])
        x_neg, _ = ebm.sgld(net, x_neg, steps or TOY["steps"], TOY["eps"] / 2,
                            math.sqrt(TOY["eps"]), bounds=(-box, box))
        buffer.push(x_neg, idx)
        energies = net(torch.cat([toys.toy_data(name, TOY["batch"], g), x_neg]))
        loss = ebm.contrastive_divergence_loss(energies[:TOY["batch"]], energies[TOY["batch"]:],
                                               TOY["alpha"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net, buffer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("8gaussians", "rings"), default="8gaussians", help="the toy")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--run-dir", default="runs", help="parent folder of the output folder")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir) / (f"ebm-toy__{args.data}__{args.seed}__"
                                    f"{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True)
    start = time.perf_counter()
    net, buffer = train_toy(args.data, seed=args.seed)
    wall, box, n = time.perf_counter() - start, TOY["box"], 200
    axis = torch.linspace(-box, box, n)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        energy = net(grid).view(n, n)
        data = toys.toy_data(args.data, 2000, torch.Generator().manual_seed(0))
        e_data, e_noise = net(data), net(buffer.noise(2000, (2,), "cpu")).mean().item()
    common.save_panels({f"data: {args.data}": data,
                        "learned density exp(-E) (its grid maximum = 1)":
                            torch.exp(-(energy - energy.min())),
                        "log density -E (down to the data's highest E)":
                            (-energy).clamp(min=-e_data.max().item()),
                        f"samples: the replay buffer (SGLD, K = {TOY['steps']})":
                            buffer.samples[:2000]},
                       run_dir / "toy.png", box)
    result = {"data": args.data, **TOY, "wall_s": wall, "mean_energy_data": e_data.mean().item(),
              "mean_energy_uniform": e_noise}
    (run_dir / "toy.json").write_text(json.dumps(result, indent=2))
    print(f"toy {args.data}: {TOY['iterations']} updates in {wall:.1f} s; mean E on data "
          f"{result['mean_energy_data']:.2f}, on uniform noise over the box {e_noise:.2f}; "
          f"{run_dir}/toy.png")
    return run_dir


if __name__ == "__main__":
    main()
