"""Test bits/dim for the three families on one axis: NCSN by its probability-flow ODE, the EBM by
annealed importance sampling (AIS), the VAE by its importance-weighted bound. Known answers first.

    OMP_NUM_THREADS=1 python -m experiments.likelihood known   # closed forms, quadrature (3 min)
    python -m experiments.likelihood ncsn runs/RUN --n 100      # writes RUN/likelihood.json
    python -m experiments.likelihood ebm runs/RUN --n 100 --ais-steps 1000 --chains 100
    python -m experiments.likelihood vae runs/RUN --n 100 --iw-samples 1000

Dequantisation (Theis et al. 2016, https://arxiv.org/abs/1511.01844). Pixels are integers k in
{0, ..., 255}^D. A density p on [0, 1]^D gives k the mass of its bin of side 1/256, and Jensen's
inequality gives a bound that one uniform u per test image estimates without bias:

    -log P(k) = D log 256 - log E_u p((k + u) / 256) <= D log 256 - E_u log p((k + u) / 256),
    bits/dim = -log P(k) / (D ln 2) <= 8 - E_u log p(x) / (D ln 2),    D = 3 * 32 * 32.      (1)

(score_sde's "offset = 7 - inverse_scaler(-1)" is this 8; 7 for data in [-1, 1], bins 2/256.)

NCSN (Song et al. 2021, https://arxiv.org/abs/2011.13456, Sec. 4.3, App. D). Blurring the data
by a growing sigma is the variance-exploding process; its probability-flow ODE

    dx/dsigma = -sigma s(x, sigma)                                                           (2)

carries x(sigma_min) ~ p_sigma_min to x(sigma) ~ p_sigma: an invertible map, a continuous
normalising flow. Along a flow dx/dsigma = f a moving point sees d log p / dsigma = -div_x f
(the continuity equation; Chen et al. 2018, https://arxiv.org/abs/1806.07366, Thm. 1), so

    d log p_sigma(x(sigma)) / dsigma = +sigma div_x s(x, sigma),                             (3)
    log p_sigma_min(x) = log N(x(sigma_max); 0, sigma_max^2 I) - int sigma div_x s dsigma.    (4)

Sign check: on N(0, (1 + sigma^2) I) the point x = 0 stays put and div s = -D / (1 + sigma^2),
so (3) says d log p / dsigma = -D sigma / (1 + sigma^2): the slope of -D/2 log(1 + sigma^2).
The prior N(0, sigma_max^2 I) (score_sde's) stands in for p_sigma_max, the data blurred by
sigma_max, whose mean is the data's mean mu: that costs about |mu|^2 / (2 sigma_max^2) nats per
image (0.14 for CIFAR-10 at sigma_max = 50: 6e-5 bits/dim). Where mu is large against sigma_max
(the 2-D mixture) `prior_mean` centres it. With a learned score, (4) is the exact log density of the
flow's own model (the prior pushed through (2)), up to the solver's tolerance; it models
p_sigma_min, the data blurred by sigma_min (0.01 = 2.6 bins), and its mass outside the cube only
loosens (1). The solver's clock is t = log sigma (dx/dt = -sigma^2 s, score_sde's VE time):
scipy's RK45 with rtol = atol = 1e-5, as score_sde. The divergence is exact (one backward pass
per dimension) or Hutchinson-Skilling's eps^T (ds/dx) eps with Rademacher eps drawn once per
trajectory (FFJORD, Grathwohl et al. 2019): the path does not depend on eps, so (4) is unbiased.

EBM (Neal 2001, https://arxiv.org/abs/physics/9803008). p(x) = exp(-E(x)) / Z on a box
[lo, hi]^D (ebm.py's sampler clamps images to [0, 1]). AIS walks from the uniform
p_0 = (hi - lo)^-D through f_beta = p_0^(1 - beta) exp(-E)^beta, 0 = beta_0 < ... < beta_K = 1:
x ~ p_0, log w = 0, then for k = 1..K

    log w += log f_beta_k(x) - log f_beta_k-1(x) = (beta_k - beta_k-1) (D log(hi - lo) - E(x)),
    x ~ T_k(x, .): a MALA step that leaves f_beta_k invariant (moves out of the box rejected). (5)

E[w] = Z for every K (w is an importance weight on whole chains), but the log of an unbiased
mean is biased down (Jensen): E[log Z_hat] <= log Z for log Z_hat = log mean_m w_m over M
chains, so bits/dim = 8 + (E(x) + log Z_hat) / (D ln 2) are optimistic (too low) by that bias.
Run backwards (beta 1 -> 0) from exact samples of p, the same sum estimates 1/Z, and -log mean w
is too high in expectation: a sandwich (BDMC, Grosse et al. 2015). Only the 2-D toys have exact
samples (quadrature); test images are not samples of the model: a reverse run from them bounds
nothing. On images a MALA proposal stays in the cube only if its noise is about 1e-3 a pixel, so
the chains barely move and AIS is close to annealed importance sampling from the uniform. And
as log Z >= -(mean of E over the cube) (Jensen), one bit/dim below 8 needs test energies
D ln 2 = 2,129 nats below that mean; IGEBM's loss keeps |E| near 1, so expect about 8. ebm.py
samples at a temperature of about 1e-6: its pictures come from a far sharper density.

VAE: vae.iwae_logp's L_K (Burda et al. 2016) bounds log P(k) of the discrete pixels directly.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

import common
from common import IMAGE_DIMS, UserError
from experiments import toys


def dequantise(images, generator):
    """uint8 images k -> x = (k + u) / 256, u ~ U[0, 1) per subpixel: the points of Eq. (1)."""
    u = torch.rand(images.shape, generator=generator, dtype=torch.float64)
    return (images.double() + u) / 256


def bits_per_dim_from_density(log_p, dims=IMAGE_DIMS):
    """Eq. (1): 8 - log p(x) / (D ln 2) for a density on [0, 1]^D with bins of side 1/256."""
    return (dims * math.log(256) - log_p) / (dims * math.log(2))


# ----------------------------------------------------------------------------------------------
# NCSN: the probability-flow ODE
# ----------------------------------------------------------------------------------------------

def score_and_divergence(score, x, sigma, probe=None):
    """s(x, sigma) and div_x s = sum_i ds_i/dx_i per point: exact (a backward pass per dimension),
    or Hutchinson-Skilling's eps^T (ds/dx) eps for a probe eps with E[eps eps^T] = I.

    Differentiating the batch's sum is exact: no point's score depends on another point."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        s = score(x, sigma)
        if probe is not None:
            eps_jacobian = torch.autograd.grad((s * probe).sum(), x)[0]  # one backward pass
            return s.detach(), (eps_jacobian * probe).flatten(1).sum(1)
        flat = s.flatten(1)
        diagonal = [torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0].flatten(1)[:, i]
                    for i in range(flat.shape[1])]
        return s.detach(), torch.stack(diagonal, 1).sum(1)


def ode_log_prob(score, x, sigma_min, sigma_max, exact=False, seed=0, prior_mean=0.0,
                 rtol=1e-5, atol=1e-5):
    """(log p_sigma_min(x) per point by Eqs. (2)-(4), the solver's network evaluations nfev).

    The state (x, I) moves in t = log sigma: dx/dt = -sigma^2 s, dI/dt = sigma^2 div_x s, from
    (x, 0) at sigma_min. RK45's steps are shared by the batch (as in score_sde): nfev counts
    evaluations of the whole batch."""
    shape, batch, dims = x.shape, x.shape[0], x[0].numel()
    probe = None
    if not exact:  # Rademacher +-1, fixed along the trajectory (see the module docstring)
        g = torch.Generator().manual_seed(seed)
        probe = (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(x)

    def derivative(t, state):
        sigma = math.exp(t)
        xt = torch.from_numpy(state[:-batch]).view(shape).to(x)
        s, div = score_and_divergence(score, xt, torch.full((batch,), sigma).to(x), probe)
        return np.concatenate([(-sigma**2 * s).flatten().double().cpu().numpy(),
                               (sigma**2 * div).double().cpu().numpy()])

    start = np.concatenate([x.flatten().double().cpu().numpy(), np.zeros(batch)])
    solution = solve_ivp(derivative, (math.log(sigma_min), math.log(sigma_max)), start,
                         method="RK45", rtol=rtol, atol=atol)
    end = torch.from_numpy(solution.y[:, -1])
    x_top, integral = end[:-batch].view(batch, dims), end[-batch:]
    prior_mean = torch.as_tensor(prior_mean, dtype=torch.float64).cpu().flatten()
    prior = -0.5 * ((x_top - prior_mean) ** 2).sum(1) / sigma_max**2 \
        - 0.5 * dims * math.log(2 * math.pi * sigma_max**2)  # log N(x_top; mean, sigma_max^2 I)
    return prior - integral, solution.nfev


def gaussian_score(mean, variance):
    """The score of N(mean, diag(variance)) blurred by sigma: -(x - mean) / (variance + sigma^2)."""
    def score(x, sigma):
        return -(x - mean) / (variance + sigma.view(-1, *[1] * (x.dim() - 1)) ** 2)
    return score


def gaussian_log_prob(x, mean, variance, sigma):
    """log N(x; mean, diag(variance + sigma^2)), summed over each point's dimensions."""
    var = variance + sigma**2
    return (-0.5 * (x - mean) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).flatten(1).sum(1)


def mixture_score(x, sigma):
    """The exact score of NCSN's 2-D mixture blurred by sigma, differentiable in x (needs grad)."""
    return torch.autograd.grad(toys.mixture_log_prob(x, sigma).sum(), x, create_graph=True)[0]


# ----------------------------------------------------------------------------------------------
# EBM: annealed importance sampling
# ----------------------------------------------------------------------------------------------

def energy_and_grad(energy, x):
    """E(x) (M,) and grad_x E(x); nothing is kept for the network's weights."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        e = energy(x)
        return e.detach(), torch.autograd.grad(e.sum(), x)[0]


def mala_step(energy, x, e, grad, beta, box, step, generator):
    """One Metropolis-adjusted Langevin step for pi(x) ~ exp(-beta E(x)) on [lo, hi]^D:
    y = x - step beta grad E(x) + sqrt(2 step) xi, kept with probability
    min(1, pi(y) q(x|y) / (pi(x) q(y|x))), log q(y|x) = -|y - x + step beta grad E(x)|^2 / (4 step).
    pi(y) = 0 outside the box, so such y are rejected. Returns (x, E, grad E, accepted)."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    y = x - step * beta * grad + math.sqrt(2 * step) * noise
    e_y, grad_y = energy_and_grad(energy, y)
    log_q_forward = -0.5 * (noise**2).flatten(1).sum(1)  # y - x + step beta grad = sqrt(2 step) xi
    log_q_backward = -((x - y + step * beta * grad_y) ** 2).flatten(1).sum(1) / (4 * step)
    log_ratio = -beta * (e_y - e) + log_q_backward - log_q_forward
    inside = ((y >= box[0]) & (y <= box[1])).flatten(1).all(1)
    u = torch.rand(len(x), generator=generator, device=x.device, dtype=x.dtype)
    accept = inside & (u.log() < log_ratio)
    moved = accept.view(-1, *[1] * (x.dim() - 1))
    return (torch.where(moved, y, x), torch.where(accept, e_y, e), torch.where(moved, grad_y, grad),
            accept)


def ais(energy, x, betas, box, step, generator=None):
    """(log w per chain by Eq. (5), the final states, the MALA acceptance rate) along `betas`.

    betas 0 -> 1 from x ~ uniform on the box: E[w] = Z. betas 1 -> 0 from exact samples of
    exp(-E) / Z: E[w] = 1 / Z (the reverse half of BDMC)."""
    log_volume = x[0].numel() * math.log(box[1] - box[0])  # = -log p_0: the base is normalised
    e, grad = energy_and_grad(energy, x)
    log_w = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    accepted = 0.0
    for beta_before, beta in zip(betas[:-1], betas[1:]):
        log_w += (beta - beta_before) * (log_volume - e.double())  # at the state before the move
        x, e, grad, accept = mala_step(energy, x, e, grad, beta, box, step, generator)
        accepted += accept.float().mean().item() / (len(betas) - 1)
    return log_w, x, accepted


def log_mean_exp(log_w):
    """log Z_hat = log (1/M) sum_m exp(log w_m), without overflow."""
    return (torch.logsumexp(log_w, 0) - math.log(len(log_w))).item()


@torch.no_grad()
def grid_log_partition(energy, half_width, cells=500, samples=0, generator=None):
    """log Z = log int_[-a, a]^2 exp(-E) by the midpoint rule, logsumexp_c(-E(c)) + 2 log h with
    h = 2a / cells; and `samples` draws from exp(-E) / Z (a cell c with probability
    exp(-E(c)) h^2 / Z, then uniform inside it): the exact starts of a reverse AIS run."""
    h = 2 * half_width / cells
    axis = torch.linspace(-half_width + h / 2, half_width - h / 2, cells, dtype=torch.float64)
    centres = torch.cartesian_prod(axis, axis)  # (cells^2, 2)
    minus_e = torch.cat([-energy(c.float()).double() for c in centres.split(100_000)])
    log_z = (torch.logsumexp(minus_e, 0) + 2 * math.log(h)).item()
    if not samples:
        return log_z, None
    cell = torch.multinomial((minus_e - minus_e.max()).exp(), samples, replacement=True,
                             generator=generator)
    jitter = (torch.rand(samples, 2, generator=generator, dtype=torch.float64) - 0.5) * h
    return log_z, (centres[cell] + jitter).float()


# ----------------------------------------------------------------------------------------------
# Loading runs: the only lines that know the model files' names (adapt them here if they change)
# ----------------------------------------------------------------------------------------------

def load_ncsn(run, device):
    """(score(x, sigma): an ncsn.py run's EMA network, sigma_min, sigma_max, its arguments)."""
    import ncsn

    args = ncsn.parse_args(["--sample", str(run)])
    if args.score_param == "embed":  # its sigma embedding knows only its ladder (ncsn.py README)
        print("warning: the ODE asks an 'embed' network about sigmas between its levels",
              file=sys.stderr)
    net, _ = ncsn.load_trained(run, args, device)
    return net, args.sigma_min, args.sigma_max, args


def load_ebm(run, device):
    """(E(x) (B,) of an ebm.py run, dropout off so that p(x) is not random; its arguments)."""
    import ebm

    args = ebm.parse_args(["--sample", str(run)])
    net, _ = ebm.load_trained(run, args, device)
    net.eval()
    return lambda x: net(x).float(), args


def load_vae(run, device):
    """(L_K(uint8 images, K) by vae.iwae_logp, pixels scaled as vae.py does; the arguments)."""
    import vae

    args = vae.parse_args(["--sample", str(run)])
    if args.kl_weight != 1:  # vae.py reports no bits/dim for these runs (its Eq. 6)
        raise UserError(f"{run}: --kl-weight {args.kl_weight:g} trains no bound (see vae.py)")
    net, _ = vae.load_trained(run, args, device)
    return lambda images, k: vae.iwae_logp(net, images.float() / 127.5 - 1, k), args


def load_toy_energy(name, iterations=None, seed=1):
    """(E, the half-width of its box) of experiments/ebm_toy.py's 2-D model, trained here."""
    from experiments import ebm_toy

    net, _ = ebm_toy.train_toy(name, iterations=iterations, seed=seed)
    return net.requires_grad_(False), ebm_toy.TOY["box"]


# ----------------------------------------------------------------------------------------------
# One row per run: test bits/dim (method, N, spread)
# ----------------------------------------------------------------------------------------------

def table_row(run, model, method, bits_per_dim, **extra):
    """{run, model, method, n, bits_per_dim: the mean over images, spread: its standard error}."""
    n = len(bits_per_dim)
    spread = bits_per_dim.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return {"run": Path(run).name, "model": model, "method": method, "n": n,
            "bits_per_dim": bits_per_dim.mean().item(), "spread": spread, **extra}


def held_out(args, n):
    """The first n test images of the run's data, uint8 (n, 3, 32, 32): common.py shuffles them."""
    return common.load_images(args.data, args.data_root, "test")[:n]


def ncsn_row(run, n, batch_size, device, seed=0):
    """Eq. (1) with the ODE's log p_sigma_min (4): one u and one probe per image, so the
    standard error over images includes both."""
    score, sigma_min, sigma_max, args = load_ncsn(run, device)
    g = torch.Generator().manual_seed(seed)
    bits, nfev = [], []
    for i, batch in enumerate(held_out(args, n).split(batch_size)):
        x = dequantise(batch, g).float().to(device)
        log_p, evaluations = ode_log_prob(score, x, sigma_min, sigma_max, seed=seed + i)
        bits.append(bits_per_dim_from_density(log_p))
        nfev.append(evaluations)
    nfe = sum(nfev) / len(nfev)
    method = f"probability-flow ODE (RK45, 1e-5, Hutchinson), sigma {sigma_min:g} to " \
        f"{sigma_max:g}, {nfe:.0f} evaluations a batch"
    return table_row(run, "ncsn", method, torch.cat(bits), nfe_per_batch=nfe)


def ebm_row(run, n, ais_steps, chains, repeats, step, batch_size, device, seed=0):
    """Eq. (1) with log p = -E(x) - log Z_hat, log Z_hat from the pooled repeats x chains weights
    (5). Too low in expectation (Jensen), so these bits/dim are optimistic."""
    energy, args = load_ebm(run, device)
    g = torch.Generator(device).manual_seed(seed)
    betas = torch.linspace(0, 1, ais_steps + 1).tolist()
    log_w, log_z_runs = [], []
    for _ in range(repeats):  # independent runs: their spread is that of log Z_hat for M chains
        start = torch.rand(chains, 3, 32, 32, generator=g, device=device)  # p_0: uniform on [0,1]^D
        weights, _, acceptance = ais(energy, start, betas, (0.0, 1.0), step, g)
        log_w.append(weights)
        log_z_runs.append(log_mean_exp(weights))
    log_z = log_mean_exp(torch.cat(log_w))
    cpu = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        e = torch.cat([energy(dequantise(b, cpu).float().to(device)).double().cpu()
                       for b in held_out(args, n).split(batch_size)])
    spread = torch.tensor(log_z_runs).std().item() if repeats > 1 else float("nan")
    method = f"AIS, K = {ais_steps}, {repeats} x {chains} chains: log Z {log_z:.2f} (too low in " \
        f"expectation; sd {spread:.2f} over runs)"
    return table_row(run, "ebm", method, bits_per_dim_from_density(-e - log_z), log_z=log_z,
                     log_z_runs=log_z_runs, mala_step=step, mala_acceptance=acceptance)


def vae_row(run, n, iw_samples, batch_size, device, seed=0):
    """-L_K / (D ln 2) per image: vae.py's importance-weighted bound on the discrete pixels."""
    iwae_log_prob, args = load_vae(run, device)
    torch.manual_seed(seed)  # vae.iwae_logp draws z from the global generator
    with torch.inference_mode():
        log_p = torch.cat([iwae_log_prob(b.to(device), iw_samples).double().cpu()
                           for b in held_out(args, n).split(batch_size)])
    bits = -log_p / (IMAGE_DIMS * math.log(2))
    return table_row(run, "vae", f"IWAE bound, K = {iw_samples}", bits)


def markdown(rows):
    lines = ["| run | model | test bits/dim | spread (s.e.) | N | method |", "|---" * 6 + "|"]
    return "\n".join(lines + [f"| {r['run']} | {r['model']} | {r['bits_per_dim']:.4f} | "
                              f"{r['spread']:.4f} | {r['n']} | {r['method']} |" for r in rows])


# ----------------------------------------------------------------------------------------------
# Known answers: closed forms for the ODE, quadrature for AIS
# ----------------------------------------------------------------------------------------------

MIXTURE_MEAN = sum(w * torch.tensor(m, dtype=torch.float64)
                   for w, m in zip(toys.MIXTURE_WEIGHTS, toys.MIXTURE_MEANS))  # (3, 3)


def ode_known_answers(copies=50, sigma_min=0.01):
    """Rows (problem, divergence, max |ODE - closed form| / D over 8 points, nfev) on
    N(mean, diag(variance)) in 6 and 3x32x32 dimensions (sigma_max = 50) and NCSN's 2-D mixture;
    and the worst |Hutchinson's mean - exact| in standard errors, from `copies` probes a point.
    The prior is centred on the problem's mean (in 2-D a prior |mu| = 4.2 off costs about
    |mu| / sigma_max nats a point) and the mixture's sigma_max is 200: its variance, 17 a
    coordinate, still costs up to 0.023 nats a dimension at 50, falling as 1 / sigma_max^2."""
    g, rows = torch.Generator().manual_seed(0), []
    for shape in ((6,), (3, 32, 32)):
        mean = torch.rand(shape, generator=g, dtype=torch.float64)
        variance = 0.1 * torch.rand(shape, generator=g, dtype=torch.float64) ** 4 + 1e-4
        x = mean + variance.sqrt() * torch.randn(8, *shape, generator=g, dtype=torch.float64)
        truth, dims = gaussian_log_prob(x, mean, variance, sigma_min), x[0].numel()
        for exact in (True, False) if dims < 10 else (False,):  # diagonal: Rademacher is exact
            log_p, nfev = ode_log_prob(gaussian_score(mean, variance), x, sigma_min, 50.0, exact,
                                       prior_mean=mean)
            rows.append((f"Gaussian, D = {dims}", "exact" if exact else "Hutchinson, 1 probe",
                         ((log_p - truth) / dims).abs().max().item(), nfev))
    x = torch.cat([toys.toy_data("mixture", 6, g).double(), torch.tensor([[0.0, 0], [1, -2]])])
    truth = toys.mixture_log_prob(x, sigma_min)
    exact, nfev = ode_log_prob(mixture_score, x, sigma_min, 200.0, True, 0, MIXTURE_MEAN)
    rows.append(("mixture, D = 2", "exact", ((exact - truth) / 2).abs().max().item(), nfev))
    probes, nfev = ode_log_prob(mixture_score, x.repeat(copies, 1), sigma_min, 200.0,
                                prior_mean=MIXTURE_MEAN)  # each copy of a point has its own probe
    probes = probes.view(copies, len(x))
    rows.append(("mixture, D = 2", f"Hutchinson, mean of {copies} probes",
                 ((probes.mean(0) - truth) / 2).abs().max().item(), nfev))
    z_scores = (probes.mean(0) - exact) / (probes.std(0) / math.sqrt(copies))
    return rows, z_scores.abs().max().item(), probes.std(0).max().item()


def ais_known_answers(name, ks=(10, 100, 1000), chains=4000, repeats=5, step=0.03,
                      iterations=None):
    """(log Z by quadrature, rows (K, mean and sd over repeats of forward log Z_hat - log Z, the
    same for reverse runs from exact samples, MALA acceptance)) on an experiments/ebm_toy.py
    energy."""
    energy, half_width = load_toy_energy(name, iterations)
    box, g = (-half_width, half_width), torch.Generator().manual_seed(0)
    log_z, exact = grid_log_partition(energy, half_width, 500, chains * repeats, g)
    rows = []
    for k in ks:
        betas, forward, reverse = torch.linspace(0, 1, k + 1).tolist(), [], []
        for r in range(repeats):
            start = (2 * torch.rand(chains, 2, generator=g) - 1) * half_width
            log_w, _, acceptance = ais(energy, start, betas, box, step, g)
            forward.append(log_mean_exp(log_w) - log_z)
            log_w, _, _ = ais(energy, exact[r * chains:(r + 1) * chains], betas[::-1], box, step, g)
            reverse.append(-log_mean_exp(log_w) - log_z)
        forward, reverse = torch.tensor(forward), torch.tensor(reverse)
        rows.append((k, forward.mean().item(), forward.std().item(), reverse.mean().item(),
                     reverse.std().item(), acceptance))
    return log_z, rows


def known(chains, repeats):
    """Print the known-answer tables (the first command of the module docstring)."""
    rows, worst_z, spread = ode_known_answers()
    print("| problem | divergence | max abs error / D (nats) | nfev |\n" + "|---" * 4 + "|")
    print("\n".join(f"| {p} | {d} | {e:.1e} | {n} |" for p, d, e, n in rows))
    print(f"Hutchinson's mean vs the exact divergence: worst point {worst_z:.2f} standard errors; "
          f"one probe's spread up to {spread:.3f} nats")
    for name in ("8gaussians", "rings"):
        log_z, rows = ais_known_answers(name, chains=chains, repeats=repeats)
        print(f"\n{name}: log Z = {log_z:.4f} (quadrature); AIS, {repeats} runs of {chains} chains")
        print("| K | forward - log Z | sd | reverse - log Z | sd | accepted |\n" + "|---" * 6 + "|")
        print("\n".join(f"| {k} | {f:+.4f} | {fs:.4f} | {r:+.4f} | {rs:.4f} | {a:.2f} |"
                        for k, f, fs, r, rs, a in rows))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=("known", "ncsn", "ebm", "vae"), help="'known': known answers")
    p.add_argument("run", nargs="?", help="a run folder of that model's script")
    p.add_argument("--n", type=common.positive_int, default=100, help="test images")
    p.add_argument("--batch-size", type=common.positive_int, default=25, help="images per batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of u, the probes and the chains")
    p.add_argument("--ais-steps", type=common.positive_int, default=1000, help="ebm: AIS's K")
    p.add_argument("--chains", type=common.positive_int, help="AIS chains (ebm 100, known 4000)")
    p.add_argument("--repeats", type=common.positive_int, default=5, help="independent AIS runs")
    p.add_argument("--mala-step", type=common.positive_float, default=1e-7,
                   help="ebm: MALA's step; noise sqrt(2 step) a pixel, exits from [0, 1] rejected")
    p.add_argument("--iw-samples", type=common.positive_int, default=1000, help="vae: L_K's K")
    cli = p.parse_args(argv)
    if cli.model == "known":
        return known(cli.chains or 4000, cli.repeats)
    if cli.run is None:
        raise UserError(f"give a run folder: python -m experiments.likelihood {cli.model} runs/RUN")
    device = torch.device(cli.device)
    if cli.model == "ncsn":
        row = ncsn_row(cli.run, cli.n, cli.batch_size, device, cli.seed)
    elif cli.model == "ebm":
        row = ebm_row(cli.run, cli.n, cli.ais_steps, cli.chains or 100, cli.repeats, cli.mala_step,
                      cli.batch_size, device, cli.seed)
    else:
        row = vae_row(cli.run, cli.n, cli.iw_samples, cli.batch_size, device, cli.seed)
    (Path(cli.run) / "likelihood.json").write_text(json.dumps(row, indent=2))
    print(markdown([row]))
    return row


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"likelihood.py: error: {e}")
