"""Why one noise level is not enough: the NCSN paper's Fig. 3 on a 2-D mixture, seconds on a laptop.

    python -m experiments.ncsn_toy          # runs/ncsn-toy__.../toy.png and toy.json

On 0.8 N((5,5), I) + 0.2 N((-5,-5), I), whose score is exact (toys.mixture_log_prob), from uniform
starts on [-8, 8]^2: (a) plain Langevin with the data's own score (1,000 steps of 0.1) leaves each
chain in the mode it starts near, so about half go to the small mode; (b) annealed Langevin
(ncsn.py's annealed_langevin, 10 levels from sigma 20 to 1, 100 steps each) lets chains cross while
the noise is large and recovers 0.8 / 0.2; (c) the same with a small MLP score learned by ncsn.py's
DSM loss. Its samples are slightly wider than the data: they are draws of the data blurred at the
last level, 1.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the model files are scripts at the top of the repository

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import common  # noqa: E402
import ncsn  # noqa: E402
from experiments import toys  # noqa: E402


def exact_mixture_score(x, sigma):
    """grad_x log p_sigma(x) of the toy mixture, by autograd of its exact log density."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(toys.mixture_log_prob(x, sigma).sum(), x)[0]


def share_in_first_mode(x):
    return (x.sum(1) > 0).float().mean().item()  # the (5, 5) side of the line x + y = 0


def learned_score(iterations=3000, sigmas=ncsn.geometric_sigmas(20.0, 1.0, 10)):  # noqa: B008
    """s(x, sigma) = f(x, log sigma) / sigma, a small MLP trained by ncsn.dsm_loss on the
    mixture."""
    mlp = nn.Sequential(nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                        nn.Linear(128, 2))

    def score(x, sigma):
        return mlp(torch.cat([x, sigma.log()[:, None]], 1)) / sigma[:, None]

    optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    for _ in range(iterations):
        optimizer.zero_grad()
        ncsn.dsm_loss(score, toys.toy_data("mixture", 256), sigmas).mean().backward()
        optimizer.step()
    return score


def main(argv=None, n=1280):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--run-dir", default="runs", help="parent folder of the output folder")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir) / f"ncsn-toy__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    torch.manual_seed(args.seed)
    sigmas, learned = ncsn.geometric_sigmas(20.0, 1.0, 10), learned_score()
    start = lambda: 16 * torch.rand(n, 2) - 8  # noqa: E731  uniform on [-8, 8]^2
    plain = lambda x, sigma: exact_mixture_score(x, 0.0)  # noqa: E731  one level: the data's score
    with torch.no_grad():
        panels = {"data": toys.toy_data("mixture", n),
                  "(a) Langevin, exact score, 1000 steps":
                      ncsn.annealed_langevin(plain, start(), torch.ones(1), 1000, 0.1, False),
                  "(b) annealed Langevin, exact score":
                      ncsn.annealed_langevin(exact_mixture_score, start(), sigmas, 100, 0.1, False),
                  "(c) annealed Langevin, learned score":
                      ncsn.annealed_langevin(learned, start(), sigmas, 100, 0.1, False)}
    shares = {name: share_in_first_mode(x) for name, x in panels.items()}
    common.save_panels({f"{k}\nshare at (5,5): {shares[k]:.2f}": x for k, x in panels.items()},
                       run_dir / "toy.png", 10,
                       "0.8 N((5,5), I) + 0.2 N((-5,-5), I): Langevin gets the modes' weights "
                       "wrong; annealing fixes it")
    (run_dir / "toy.json").write_text(json.dumps(shares, indent=2))
    for name, share in shares.items():
        print(f"{share:.3f}  share of samples in the (5,5) mode: {name}")
    print(f"figure: {run_dir}/toy.png")
    return run_dir


if __name__ == "__main__":
    main()
