"""The 2-D toy densities of the toy experiments (NCSN, EBM, the likelihood checks): samplers and the
mixture's exact log density, whose gradient is the true score."""

import math

import torch

from common import UserError

# 2-D toy data for the toy experiments. The mixture is the NCSN paper's (Song & Ermon 2019, Fig. 3).
MIXTURE_WEIGHTS, MIXTURE_MEANS, MIXTURE_STD = (0.8, 0.2), ((5.0, 5.0), (-5.0, -5.0)), 1.0


def toy_data(name, n, generator=None):
    """n points (n, 2) from 'mixture', '8gaussians' or 'rings'."""
    g = generator
    if name == "mixture":
        first = torch.rand(n, generator=g) < MIXTURE_WEIGHTS[0]
        means = torch.tensor(MIXTURE_MEANS)[torch.where(first, 0, 1)]
        return means + MIXTURE_STD * torch.randn(n, 2, generator=g)
    if name == "8gaussians":
        angle = torch.randint(0, 8, (n,), generator=g) * (math.pi / 4)
        centres = 2.0 * torch.stack([angle.cos(), angle.sin()], 1)
        return centres + 0.15 * torch.randn(n, 2, generator=g)
    if name == "rings":
        radius = torch.randint(1, 4, (n,), generator=g).float()  # three rings, radii 1, 2, 3
        angle = 2 * math.pi * torch.rand(n, generator=g)
        circles = radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1)
        return circles + 0.08 * torch.randn(n, 2, generator=g)
    raise UserError(f"unknown toy dataset {name!r} (choose mixture, 8gaussians or rings)")


def mixture_log_prob(x, sigma=0.0):
    """Exact log density of the toy mixture plus N(0, sigma^2 I) noise, whose gradient is the true
    score: noise only widens each Gaussian component, var = std^2 + sigma^2."""
    means = torch.tensor(MIXTURE_MEANS, dtype=x.dtype, device=x.device)  # (2, 2)
    log_w = torch.tensor(MIXTURE_WEIGHTS, dtype=x.dtype, device=x.device).log()
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)
    var = MIXTURE_STD**2 + sigma**2
    sq = ((x[:, None, :] - means) ** 2).sum(-1) / var  # (N, 2)
    return torch.logsumexp(log_w - 0.5 * sq - torch.log(2 * math.pi * var), dim=1)
