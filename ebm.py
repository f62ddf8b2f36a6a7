"""An energy-based model (EBM) of CIFAR-10, trained by contrastive divergence with SGLD and a replay buffer.

    python ebm.py                                   # train IGEBM's unconditional CIFAR-10 model (18.6M, K = 60)
    python ebm.py --toy                             # 2-D demo on the CPU in under a minute
    python ebm.py --sample runs/RUN --n 64          # fresh samples; --eval RUN, --inpaint RUN, --bench
    torchrun --standalone --nproc_per_node=8 ebm.py # the same on 8 GPUs

The model. A network E_theta maps an image x to one number, its energy, and defines the density

    p_theta(x) = exp(-E_theta(x)) / Z(theta),      Z(theta) = integral of exp(-E_theta(x)) dx.

Low energy = likely image. Z is intractable, but its gradient is an expectation under the model,
grad_theta log Z = -E_{x ~ p_theta}[grad_theta E_theta(x)], so the maximum-likelihood gradient is

    grad_theta E_data[-log p_theta(x)] = E_{x+ ~ data}[grad_theta E(x+)] - E_{x- ~ p_theta}[grad_theta E(x-)].

Push the energy of data (positives x+) down and the energy of the model's own samples (negatives
x-) up; at the optimum the two expectations balance. Contrastive divergence (Hinton 2002) gets the
negatives from a short MCMC run and treats them as constants, so the loss is E(x+) - E(x-).

The sampler is stochastic gradient Langevin dynamics (Welling & Teh 2011):

    x_{k+1} = x_k - (eps / 2) grad_x E(x_k) + sqrt(eps) * N(0, I),

which samples p_theta as eps -> 0 and K -> infinity. IGEBM (Du & Mordatch 2019) runs K = 60
steps of x <- clamp(x - lambda * clip(grad_x E, +-0.01) + N(0, 0.005^2), 0, 1) with lambda = 10. These
chains start from a replay buffer of 10,000 past negatives (95% of each batch; 5% restart from
U(0, 1) noise), so a chain continues across training steps (persistent CD, Tieleman 2008) and
60 steps per update add up to thousands. Nijkamp et al. (2019) study the short-run alternative.

The loss (IGEBM's regularisation) adds an L2 penalty on the energies, which keeps them near zero so that
E(x+) - E(x-) cannot win by letting both run off to infinity:

    L = E(x+) - E(x-) + alpha * (E(x+)^2 + E(x-)^2),   alpha = 1;   Adam(lr 3e-4, betas (0, 0.999)).

A density needs continuous data: pixels k/255 become (k + u) / 256, u ~ U(0, 1) (uniform
dequantization), so the model cannot put infinite density on the 256 discrete values.

Training EBMs is unstable: the energies eventually blow up (JEM's and VAEBM's authors say so), and
their remedy is to restart from the last good checkpoint with a lower learning rate. This file does
that automatically; the checkpoint holds the replay buffer, so a resumed run is exact.

Out-of-distribution detection (Du & Mordatch 2019; Grathwohl et al. 2020, JEM): -E(x) is an
unnormalised log-likelihood, so it should rank test images above noise, flat colours or SVHN.

References
    Du & Mordatch 2019, Implicit Generation and Generalization in EBMs (IGEBM)  https://arxiv.org/abs/1903.08689
    Nijkamp, Hill, Zhu & Wu 2019, Learning Non-Convergent Short-Run MCMC        https://arxiv.org/abs/1904.09770
    Du, Li, Tenenbaum & Mordatch 2021, Improved Contrastive Divergence          https://arxiv.org/abs/2012.01316
    Grathwohl et al. 2020, Your Classifier is Secretly an EBM (JEM)             https://arxiv.org/abs/1912.03263
    Song & Kingma 2021, How to Train Your Energy-Based Models (a tutorial)       https://arxiv.org/abs/2101.03288
    Miyato et al. 2018, Spectral Normalization                                   https://arxiv.org/abs/1802.05957
    Welling & Teh 2011, Bayesian Learning via Stochastic Gradient Langevin Dynamics (ICML)
"""

import argparse
import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize
from tqdm import tqdm

import common
from common import UserError, non_negative_float, positive_float, positive_int

# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

COMMANDS = ("resume", "sample", "eval", "inpaint", "toy", "bench")  # what to do now: never read from a run's config


def probability(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                usage=argparse.SUPPRESS)  # no usage block: a bad flag is one line, exit status 2
    # the flags every script shares
    p.add_argument("--epochs", type=positive_int, default=100, help="passes over the training set")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per step, all processes together")
    p.add_argument("--lr", type=positive_float, default=3e-4, help="Adam learning rate (IGEBM's code: 3e-4)")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--device", choices=["auto", "cuda", "cpu", "mps"], default="auto", help="where to run")
    p.add_argument("--data", default="cifar10", help="'cifar10' or any folder of images")
    p.add_argument("--data-root", default="data", help="where CIFAR-10 and decoded-image caches live")
    p.add_argument("--run-dir", default="runs", help="parent folder of run folders")
    p.add_argument("--name", default="default", help="run name, part of the run folder's name")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision on CUDA: bf16 where native, else float16 with a gradient scaler")
    p.add_argument("--compile", action="store_true", help="torch.compile the energy network")
    p.add_argument("--track", action="store_true", help="also log to Weights & Biases (needs wandb)")
    p.add_argument("--limit-train", type=positive_int, help="use only the first N training images")
    p.add_argument("--limit-test", type=positive_int, help="test images for the test energy and --eval (default: all)")
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between logged (host-synced) losses")
    p.add_argument("--grad-clip", type=positive_float, default=0.1, help="clip the norm of the weights' gradient")
    p.add_argument("--max-bad-steps", type=positive_int, default=10,
                   help="roll back after this many bad steps in a row (non-finite, or |E| > --max-energy)")
    # what to do, if not training from scratch
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder (use --epochs to extend)")
    p.add_argument("--sample", metavar="RUN", help="write RUN/samples.png and samples.npz (see --n, --steps, --chains)")
    p.add_argument("--eval", metavar="RUN", help="FID / IS / KID, energy statistics and OOD AUROCs into RUN/eval.json")
    p.add_argument("--inpaint", metavar="RUN", help="fill the centre of test images by SGLD: RUN/inpaint.png")
    p.add_argument("--toy", nargs="?", const="8gaussians", choices=("8gaussians", "rings"),
                   help="train a 2-D MLP energy on the CPU in under a minute (default data: 8gaussians)")
    p.add_argument("--bench", action="store_true", help="measure training and sampling speed; write bench.json")
    p.add_argument("--n", type=positive_int, default=64, help="images for --sample / --eval / --inpaint")
    p.add_argument("--fid-extractor", default="inception-v3-compat", help="torch-fidelity feature extractor")
    p.add_argument("--fid-weights", metavar="FILE", help="Inception weights file, for machines with no network")
    p.add_argument("--steps", type=positive_int, help="SGLD steps for --sample / --eval / --inpaint (default: K)")
    p.add_argument("--chains", default="buffer", choices=("buffer", "noise"),
                   help="start --sample/--eval chains from the saved replay buffer (as IGEBM's samples) or from U(0,1)")
    p.add_argument("--ood", choices=("svhn",), help="--eval: also score SVHN's test set (downloaded by torchvision)")
    # the network
    p.add_argument("--width", type=positive_int, default=128,
                   help="channels of the first ResNet stage (IGEBM: 128, 18.6M parameters)")
    p.add_argument("--dropout", type=probability, default=0.5,
                   help="dropout in every block, in training and its SGLD (IGEBM: 0.5)")
    # the loss, the sampler, the replay buffer, the safety net
    p.add_argument("--alpha", type=non_negative_float, default=1.0, help="weight of alpha (E+^2 + E-^2) (IGEBM: 1)")
    p.add_argument("--sgld-steps", type=positive_int, default=60, help="SGLD steps K per training step (IGEBM: 60)")
    p.add_argument("--sgld-step-size", type=positive_float, default=10.0, help="SGLD step size lambda (IGEBM: 10)")
    p.add_argument("--sgld-noise", type=non_negative_float, default=0.005, help="SGLD noise std (IGEBM: 0.005)")
    p.add_argument("--sgld-grad-clip", type=positive_float, default=0.01, help="clip grad_x E to +-this (IGEBM: 0.01)")
    p.add_argument("--buffer-size", type=positive_int, default=10000,
                   help="replay buffer size, all processes together (IGEBM: 10,000)")
    p.add_argument("--restart-rate", type=probability, default=0.05, help="chains restarted from U(0,1) (IGEBM: 0.05)")
    p.add_argument("--max-energy", type=positive_float, default=1000.0, help="|E| beyond this is a divergence")
    p.add_argument("--max-rollbacks", type=int, default=3, help="stop after this many rollbacks to the last checkpoint")
    p.add_argument("--lr-drop", type=probability, default=0.5, help="multiply the learning rate by this at a rollback")
    args = p.parse_args(argv)
    run = args.resume or args.sample or args.eval or args.inpaint
    if run:  # the run's own settings become the defaults: `--resume RUN --epochs 300` keeps its width, data, ...
        p.set_defaults(**{k: v for k, v in read_config(run).items() if k not in COMMANDS})
        args = p.parse_args(argv)
    args.steps = args.steps or args.sgld_steps
    if args.max_rollbacks < 0:
        p.error(f"--max-rollbacks must not be negative, got {args.max_rollbacks}")
    if args.dropout == 1:
        p.error("--dropout must be below 1 (1 would drop every unit)")
    if args.track and importlib.util.find_spec("wandb") is None:
        p.error("--track needs wandb: pip install wandb")
    return args


def read_config(run):
    """The arguments a run was started with (its config.json)."""
    try:
        return json.loads((Path(run) / "config.json").read_text())["args"]
    except FileNotFoundError:
        raise UserError(f"{run} is not a run folder (no config.json)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{run}/config.json is damaged (not the JSON this project writes)") from None


# ----------------------------------------------------------------------------------------------
# The energy network
# ----------------------------------------------------------------------------------------------
# IGEBM's unconditional CIFAR-10 network (ResNet32Large in the official code, models.py; the conditional
# model is a smaller ResNet32): a stem conv and nine residual blocks, three each at 128, 256 and 512
# channels, the first of each width halving the resolution (32 -> 16 -> 8 -> 4), sum pooling, a linear
# layer: 18.6M parameters. Dropout 0.5 inside every block, as IGEBM's training runs it (also during SGLD).
# No BatchNorm: an image's energy must not depend on the other images in its batch.
# Spectral normalisation bounds each conv's Lipschitz constant, so the energy cannot become arbitrarily
# steep: the main stabiliser of IGEBM's training. The final linear layer has none (IGEBM): it only scales E.
# Ordinary conv biases where IGEBM adds a learned bias to a conv's input (the same but at the zero-padded
# border). One real change, SiLU for IGEBM's leaky ReLU (and its ReLU before the pooling): SGLD moves images along
# -grad_x E, so the network's *input gradient* is what generates images. (Leaky) ReLU makes E piecewise
# linear in x, its gradient piecewise constant, jumping between regions; SiLU is smooth, so grad_x E varies
# smoothly and SGLD follows the landscape.

class SpectralNorm(nn.Module):
    """The parametrisation W -> W / sigma(W), sigma = largest singular value of W as an (out, in*k*k) matrix,
    by power iteration (Miyato et al. 2018); at_most_one: W / max(sigma, 1), which leaves a small weight alone.

    One power-iteration step per forward in training mode (u and v are buffers); none in eval mode.
    """

    def __init__(self, weight, at_most_one=False, warmup=15):
        super().__init__()
        self.at_most_one = at_most_one
        w = weight.detach().flatten(1)
        u, v = F.normalize(torch.randn(len(w)), dim=0), None
        for _ in range(warmup):  # start from a converged estimate, not a random one
            v = F.normalize(w.T @ u, dim=0)
            u = F.normalize(w @ v, dim=0)
        self.register_buffer("u", u)
        self.register_buffer("v", v)

    def forward(self, weight):
        with torch.autocast(weight.device.type, enabled=False):  # float32 even under autocast: sigma is one number
            w = weight.flatten(1)
            if self.training:
                with torch.no_grad():
                    self.v.copy_(F.normalize(w.T @ self.u, dim=0))
                    self.u.copy_(F.normalize(w @ self.v, dim=0))
            u, v = self.u.clone(), self.v.clone()  # copies: the next forward's power iteration must not change
            sigma = u @ w @ v  # u^T W v, differentiable in W         # what this one's backward needs
            return weight / sigma.clamp(min=1) if self.at_most_one else weight / sigma


def dropout(h, p, training):
    """Dropout. On the CPU its mask comes from torch.rand: F.dropout's bernoulli_ costs 4 times as much there, and
    with a mask per block at every SGLD step it took 6-8% of the training time (README: the profile)."""
    if not training or p == 0 or h.device.type != "cpu":
        return F.dropout(h, p, training)
    return h * (torch.rand_like(h) >= p) * (1 / (1 - p))


def spectral_norm(layer, at_most_one=False):
    return parametrize.register_parametrization(layer, "weight", SpectralNorm(layer.weight, at_most_one))


class ResBlock(nn.Module):
    """silu(skip(x) + g * conv2(silu(dropout(conv1(x))))), 2x average-pooled after the sum if down (IGEBM)."""

    def __init__(self, c_in, c_out, down, dropout):
        super().__init__()
        self.conv1 = spectral_norm(nn.Conv2d(c_in, c_out, 3, padding=1))
        conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.normal_(conv2.weight, std=1e-10), nn.init.zeros_(conv2.bias)  # every block starts as the identity:
        self.conv2 = spectral_norm(conv2, at_most_one=True)  # W / max(sigma, 1) keeps it near 0 (W / sigma would not)
        self.gain = nn.Parameter(torch.ones(c_out, 1, 1))  # lets the branch grow past SN's bound of 1
        self.skip = spectral_norm(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)) if c_in != c_out else nn.Identity()
        self.down, self.dropout = down, dropout

    def forward(self, x):
        h = F.silu(dropout(self.conv1(x), self.dropout, self.training))
        out = self.skip(x) + self.gain * self.conv2(h)
        return F.silu(F.avg_pool2d(out, 2) if self.down else out)


class EnergyNet(nn.Module):
    """(B, 3, 32, 32) in [0, 1] -> energies (B,). Channels width, 2 width, 4 width; 18.6M parameters at 128."""

    def __init__(self, width=128, dropout=0.5):
        super().__init__()
        self.stem = spectral_norm(nn.Conv2d(3, width, 3, padding=1, bias=False))
        channels = [width] * 3 + [2 * width] * 3 + [4 * width] * 3
        self.blocks = nn.Sequential(*[ResBlock(c_in, c_out, i % 3 == 0, dropout)  # 32 -> 16 -> 8 -> 4
                                      for i, (c_in, c_out) in enumerate(zip([width, *channels], channels))])
        self.head = nn.Linear(4 * width, 1)

    def forward(self, x):
        h = self.blocks(F.silu(self.stem(x)))  # (B, 4 width, 4, 4)
        return self.head(h.sum((2, 3))).squeeze(1)  # sum pooling (IGEBM), then a scalar per image


def toy_energy_net(hidden=128):
    """The 2-D toy's energy: an MLP (B, 2) -> (B,), smooth for the same reason as above."""
    return nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, 1), nn.Flatten(0))


# ----------------------------------------------------------------------------------------------
# The loss, the sampler and the replay buffer
# ----------------------------------------------------------------------------------------------

def contrastive_divergence_loss(energy_pos, energy_neg, alpha):
    """L = mean E(x+) - mean E(x-) + alpha * mean(E(x+)^2 + E(x-)^2)   (IGEBM).

    The negatives come from SGLD and carry no gradient: only the first two terms' dependence on theta
    is differentiated, which is exactly the maximum-likelihood gradient of the docstring.
    """
    return energy_pos.mean() - energy_neg.mean() + alpha * ((energy_pos**2).mean() + (energy_neg**2).mean())


def sgld(energy, x, steps, step_size, noise, grad_clip=None, bounds=(0.0, 1.0), mask=None, generator=None,
         every=0):
    """K steps of x <- clamp(x - step_size * clip(grad_x E(x)) + noise * N(0, I), bounds).

    With step_size = eps / 2, noise = sqrt(eps), no clipping and no bounds this is Langevin dynamics
    and samples exp(-E). IGEBM's setting (step 10, noise 0.005, clip 0.01) is deliberately NOT in that
    proportion: Langevin would need noise sqrt(2 * 10) = 4.5. It samples exp(-E / T) at a temperature
    T = noise^2 / (2 step) ~ 1e-6, close to noisy gradient descent on the energy, which gives sharper
    images from short chains. `mask` (1 = free pixel) restricts the moves to some pixels (inpainting).
    Returns (x, mean L2 norm of grad_x E over the steps, [x every `every` steps]).
    """
    grad_norm = torch.zeros((), device=x.device)
    x = x.detach()
    chain = [x] if every else []
    with parametrize.cached():  # the spectral-normalised weights are computed once per chain, not once per step
        for k in range(steps):
            x.requires_grad_(True)
            with torch.enable_grad():  # gradients with respect to x only: nothing accumulates in the parameters
                grad = torch.autograd.grad(energy(x).sum(), x)[0]
            grad_norm += grad.flatten(1).norm(dim=1).mean() / steps
            if grad_clip is not None:
                grad = grad.clamp(-grad_clip, grad_clip)
            move = -step_size * grad + noise * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x.detach() + (move if mask is None else move * mask)
            if bounds is not None:
                x = x.clamp(*bounds)
            if every and (k + 1) % every == 0:
                chain.append(x)
    return x, grad_norm, chain


class ReplayBuffer:
    """IGEBM's replay buffer: persistent SGLD chains, a fraction restarted from uniform noise each batch."""

    def __init__(self, size, shape, device, restart_rate=0.05, low=0.0, high=1.0):
        self.restart_rate, self.low, self.high = restart_rate, low, high
        self.samples = self.noise(size, shape, device)  # (size, *shape): starts as pure noise

    def noise(self, n, shape, device):
        return self.low + (self.high - self.low) * torch.rand(n, *shape, device=device)

    def sample(self, n):
        """n chain states (and their slots): each one is, with probability restart_rate, fresh noise."""
        idx = torch.randint(len(self.samples), (n,), device=self.samples.device)
        x = self.samples[idx]
        restart = torch.rand(n, device=x.device) < self.restart_rate
        fresh = self.noise(n, x.shape[1:], x.device)
        return torch.where(restart.view(-1, *[1] * (x.dim() - 1)), fresh, x), idx

    def push(self, x, idx):
        """Store the chains' new states back into the slots they came from."""
        self.samples[idx] = x.detach()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def build(args, device):
    """The energy network (channels_last on a GPU: faster convolutions), the optimiser and the gradient
    scaler (active only for float16). No EMA: IGEBM samples with the current weights."""
    net = EnergyNet(args.width, args.dropout)
    net = net.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.0, 0.999), fused=True)  # beta1 = 0 (IGEBM)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(args, device) == torch.float16)
    return net, optimizer, scaler


def train_step(model, energy, net, optimizer, scaler, buffer, x, args, dtype):
    """One contrastive-divergence update on a batch x (B, 3, 32, 32) in [0, 1]. Returns device tensors.

    A bad step (non-finite, or |E| > --max-energy: the EBM's own sign of a blow-up) is skipped without
    asking the host: the fused Adam kernel leaves weights, moments and step count alone where found_inf is 1.
    """
    x_pos = (x * 255 + torch.rand_like(x)) / 256  # uniform dequantization: a density over [0, 1], not 256 spikes
    x_neg, idx = buffer.sample(len(x_pos))
    # no grad for the weights: SGLD needs grad_x E only (a compiled backward would compute both). The network
    # stays in training mode, so dropout is on in the chains too: IGEBM's training graph builds its model with
    # train=True and runs the chains through that same forward; its masks move pixels about as much as the
    # 0.005 noise does (measured, README). bf16 is safe here: the chain's state x stays float32, and bf16 moves
    # differ from float32 ones by 3e-5 per pixel on average, over 100 times less than the noise (README).
    net.requires_grad_(False)
    with autocast(x.device, dtype):
        x_neg, sgld_grad_norm, _ = sgld(lambda v: energy(v).float(), x_neg, args.sgld_steps, args.sgld_step_size,
                                        args.sgld_noise, args.sgld_grad_clip)
    net.requires_grad_(True)
    buffer.push(x_neg, idx)
    with autocast(x.device, dtype):
        energies = model(torch.cat([x_pos, x_neg])).float()  # one forward for both: one DDP all-reduce
    e_pos, e_neg = energies.chunk(2)
    loss = contrastive_divergence_loss(e_pos, e_neg, args.alpha)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # float16 only: the gradients back to their true size before clipping
    grad_norm = nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
    bad = ~torch.isfinite(grad_norm) | ~torch.isfinite(energies).all() | (energies.abs().max() > args.max_energy)
    if dist.is_initialized():  # every rank must skip the same steps, or their weights would part ways
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # (a device-side collective: no host sync)
    optimizer.found_inf = bad.float()
    optimizer.step()
    scaler.update()
    return torch.stack([loss.detach(), e_pos.mean().detach(), e_neg.mean().detach(), sgld_grad_norm]), bad


@torch.no_grad()
def test_metrics(net, test_images, args, device, dtype):
    """Mean energy of test images (at the centres of their dequantization bins): compare it with E(x+)."""
    net.eval()  # no dropout, no power iteration: measuring must not change the spectral norms (rank 0 alone measures)
    x = (test_images.float() + 0.5) / 256
    with autocast(device, dtype):
        energy = torch.cat([net(b.to(device)).float() for b in x.split(args.batch_size)]).mean().item()
    net.train()
    return {"test_energy": energy}


@torch.no_grad()
def write_previews(net, run_dir, epoch, args, device, dtype, buffer):
    """Per epoch: fresh chains from fixed noise (samples/epoch_NNNN.png), the buffer, one figure of chains."""
    net.eval()
    g = torch.Generator(device=device).manual_seed(args.seed)
    x0 = torch.rand(64, 3, 32, 32, generator=g, device=device)
    every = max(1, args.sgld_steps // 10)
    with autocast(device, dtype):
        x, _, chain = sgld(lambda v: net(v).float(), x0, args.sgld_steps, args.sgld_step_size, args.sgld_noise,
                           args.sgld_grad_clip, generator=g, every=every)
    common.save_grid(x, run_dir / "samples" / f"epoch_{epoch:04d}.png")
    common.save_grid(buffer.samples[:64], run_dir / "samples" / f"buffer_{epoch:04d}.png")
    rows = [(f"chain {i + 1}", torch.stack([state[i] for state in chain])) for i in range(4)]
    common.save_rows(rows, run_dir / "samples" / f"chain_{epoch:04d}.png",
                     title=f"SGLD from U(0,1) noise, epoch {epoch}: steps 0, {every}, ..., {args.sgld_steps}")
    net.train()


def whole_buffer(buffer, world):
    """Every rank's share of the replay buffer, concatenated: what the checkpoint holds. Called on all ranks."""
    if world == 1:
        return buffer.samples
    parts = [torch.empty_like(buffer.samples) for _ in range(world)]
    dist.all_gather(parts, buffer.samples)
    return torch.cat(parts)


def train(args):
    # device and DDP
    device, rank, world = setup_device(args)
    dtype = amp_dtype(args, device)
    if args.batch_size % world or args.buffer_size < world:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by, and --buffer-size at least, the "
                        f"{world} processes")
    # seed: the same initial weights on every rank (DDP checks it); each epoch reseeds the noise below
    torch.manual_seed(args.seed)
    # data
    train_images = common.load_images(args.data, args.data_root, "train")[:args.limit_train]
    test_images = common.load_images(args.data, args.data_root, "test")[:args.limit_test]
    loader = common.DeviceLoader(train_images, args.batch_size // world, device, args.seed, rank, world)
    # model, replay buffer, optimiser
    net, optimizer, scaler = build(args, device)
    energy = torch.compile(net) if args.compile else net  # the sampler's view of the network: no DDP hooks
    model = DistributedDataParallel(energy) if world > 1 else energy
    torch.manual_seed(args.seed * 10**9 + rank * 10**6)  # every rank starts its own chains
    buffer = ReplayBuffer(args.buffer_size // world, (3, 32, 32), device, args.restart_rate)
    # resume
    start_epoch, step, rollbacks = (0, 0, 0) if not args.resume else \
        resume(args, net, optimizer, scaler, buffer, rank, world)
    last_good = snapshot(net, optimizer, buffer)
    # run folder and logging (rank 0)
    run_dir, log = open_run(args, step) if rank == 0 else (None, None)
    if rank == 0:
        print(f"run folder {run_dir}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_images)} training images, {len(loader)} steps per epoch on {device} x {world}, "
              f"precision {dtype or torch.float32}")
    # the loop
    bad_streak = worst_streak = torch.zeros((), device=device)  # bad steps in a row, counted on the device
    for epoch in range(start_epoch + 1, args.epochs + 1):
        torch.manual_seed(args.seed * 10**9 + rank * 10**6 + epoch)  # each rank's and epoch's own noise: exact resume
        tick, totals = time.perf_counter(), torch.zeros(4, device=device)
        for i, x in enumerate(tqdm(loader.epoch(epoch), total=len(loader), desc=f"epoch {epoch}/{args.epochs}",
                                   disable=rank != 0, leave=False)):  # x: (B, 3, 32, 32) in [0, 1], flipped
            stats, bad = train_step(model, energy, net, optimizer, scaler, buffer, x, args, dtype)
            step += 1
            totals += stats
            bad_streak = (bad_streak + 1) * bad
            worst_streak = torch.maximum(worst_streak, bad_streak)
            if step % args.log_every == 0 or i == len(loader) - 1:  # the only host syncs
                if worst_streak.item() >= args.max_bad_steps:  # the EBM's own remedy (JEM's, VAEBM's): roll back
                    rollbacks = roll_back(last_good, net, optimizer, buffer, args, step, rollbacks, run_dir, log)
                    bad_streak = worst_streak = torch.zeros((), device=device)
                elif rank == 0:
                    loss, e_pos, e_neg, sgld_grad_norm = stats.tolist()
                    log(step, epoch=epoch, loss=loss, energy_pos=e_pos, energy_neg=e_neg, gap=e_neg - e_pos,
                        sgld_grad_norm=sgld_grad_norm, lr=optimizer.param_groups[0]["lr"],
                        img_per_s=(i + 1) * args.batch_size / (time.perf_counter() - tick))
        # end of epoch: evaluate, preview, checkpoint
        samples = whole_buffer(buffer, world)
        last_good = snapshot(net, optimizer, buffer)
        if rank == 0:
            seconds = time.perf_counter() - tick
            means = dict(zip(("loss", "energy_pos", "energy_neg", "sgld_grad_norm"), (totals / len(loader)).tolist()))
            means["gap"] = means["energy_neg"] - means["energy_pos"]  # E(x-) - E(x+): positive once data is likelier
            test = test_metrics(net, test_images, args, device, dtype)
            write_previews(net, run_dir, epoch, args, device, dtype, buffer)
            log(step, epoch=epoch, epoch_seconds=seconds, lr=optimizer.param_groups[0]["lr"], **means, **test)
            save_checkpoint(run_dir, args=vars(args), net=net.state_dict(), buffer=samples, epoch=epoch, step=step,
                            optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rollbacks=rollbacks)
            print(f"epoch {epoch}/{args.epochs}: loss {means['loss']:.4f}  E+ {means['energy_pos']:.4f}  E- "
                  f"{means['energy_neg']:.4f}  gap {means['gap']:.4f}  test E {test['test_energy']:.4f}  "
                  f"SGLD |grad| {means['sgld_grad_norm']:.4f}  ({seconds:.0f} s)")
        if world > 1:
            dist.barrier()
    if rank == 0:
        summary = {"epochs": args.epochs, "steps": step, "parameters": sum(p.numel() for p in net.parameters()),
                   "rollbacks": rollbacks, "lr": optimizer.param_groups[0]["lr"], **test,
                   **{f"last_epoch_{k}": v for k, v in means.items()}}
        log.finish(summary)
    return run_dir


def snapshot(net, optimizer, buffer):
    """What a rollback returns to: a copy of the weights, the optimiser and this rank's replay buffer."""
    return copy.deepcopy({"net": net.state_dict(), "optimizer": optimizer.state_dict(), "buffer": buffer.samples})


def roll_back(last_good, net, optimizer, buffer, args, step, rollbacks, run_dir, log):
    """Back to the weights, optimiser and replay buffer of the last checkpoint, with a lower learning rate."""
    if rollbacks >= args.max_rollbacks:
        raise UserError(f"the energy diverged (non-finite, or |E| > {args.max_energy:g}) at step {step} after "
                        f"{rollbacks} rollback(s); the last good checkpoint is in {args.resume or run_dir}: "
                        "try --resume with a lower --lr or a larger --alpha")
    lr = optimizer.param_groups[0]["lr"] * args.lr_drop
    good = copy.deepcopy(last_good)  # the live copies below must not share memory with the snapshot
    net.load_state_dict(good["net"])
    optimizer.load_state_dict(good["optimizer"])
    buffer.samples = good["buffer"]
    for group in optimizer.param_groups:
        group["lr"] = lr
    if log:
        print(f"divergence at step {step}: rolled back to the last checkpoint, lr lowered to {lr:.3g} (rollback "
              f"{rollbacks + 1} of at most {args.max_rollbacks})", file=sys.stderr)
        log(step, rollback=rollbacks + 1, lr=lr)
    return rollbacks + 1


# ----------------------------------------------------------------------------------------------
# Sampling, evaluation with OOD detection, inpainting, the 2-D toy, the benchmark
# ----------------------------------------------------------------------------------------------

def load_trained(run, args, device):
    """The run's energy network and its saved replay buffer (the chains sampling starts from)."""
    net, _, _ = build(args, device)
    ckpt = load_checkpoint(run)
    load_weights(net, ckpt["net"], run)
    return net.eval().requires_grad_(False), ckpt["buffer"]


def draw_samples(net, buffer, n, args, device, dtype):
    """n samples: SGLD chains of --steps steps from the saved buffer (IGEBM's samples) or from noise."""
    g = torch.Generator().manual_seed(args.seed)
    start = buffer[torch.randperm(len(buffer), generator=g).repeat(math.ceil(n / len(buffer)))[:n]] \
        if args.chains == "buffer" else torch.rand(n, 3, 32, 32, generator=g)  # (no repeats while the buffer lasts)
    torch.manual_seed(args.seed)
    out = []
    for x in start.split(args.batch_size):
        with autocast(device, dtype):
            x, _, _ = sgld(lambda v: net(v).float(), x.to(device), args.steps, args.sgld_step_size, args.sgld_noise,
                           args.sgld_grad_clip)
        out.append(x.cpu())
    return torch.cat(out)


def sample(args):
    """RUN/samples.png and samples.npz (uint8, NHWC)."""
    device, _, _ = setup_device(args)
    net, buffer = load_trained(args.sample, args, device)
    samples = draw_samples(net, buffer, args.n, args, device, amp_dtype(args, device))
    common.save_grid(samples, Path(args.sample) / "samples.png")
    np.savez_compressed(Path(args.sample) / "samples.npz", samples=common.to_uint8(samples).permute(0, 2, 3, 1).numpy())
    print(f"wrote {len(samples)} samples ({args.chains} chains, {args.steps} SGLD steps) to "
          f"{args.sample}/samples.png and samples.npz")
    return samples


@torch.no_grad()
def energies_of(net, x, args, device, dtype):
    with autocast(device, dtype):
        return torch.cat([net(b.to(device)).float().cpu() for b in x.split(args.batch_size)])


def test_subset(args, n=None):
    """The first n test images at the centres of their dequantization bins, (n, 3, 32, 32) in [0, 1]. A fair
    sample: common.py stores every split in a fixed shuffled order."""
    return (common.load_images(args.data, args.data_root, "test")[:n].float() + 0.5) / 256


def auroc(scores_in, scores_out):
    """P(score_in > score_out) + P(tie) / 2 over all pairs: the area under the ROC curve (Mann-Whitney U)."""
    ordered = scores_out.double().sort().values
    below = torch.searchsorted(ordered, scores_in.double(), right=False).double()
    ties = torch.searchsorted(ordered, scores_in.double(), right=True).double() - below
    return float((below + ties / 2).sum() / (len(scores_in) * len(scores_out)))


def load_svhn(data_root, n):
    from torchvision.datasets import SVHN

    root = Path(data_root) / "svhn"
    try:
        data = SVHN(str(root), split="test", download=True).data  # (N, 3, 32, 32) uint8
    except Exception as e:  # no network, a refused connection, a corrupt file...
        raise UserError(f"--ood svhn: SVHN is not in {root}/ and could not be downloaded ({type(e).__name__}): "
                        f"put test_32x32.mat in {root}/, or leave out --ood") from None
    return (torch.from_numpy(data[:n]).float() + 0.5) / 256  # the bin centres, as for the test images


def ood_sets(test, generator):
    """Out-of-distribution inputs, each (N, 3, 32, 32). IGEBM's own evaluation (its code's mixenergy task) scores
    test images against SVHN (--ood svhn), CIFAR-100, textures, the average of two test images and N(0.5, 0.5^2)
    noise; the last two run offline, and so do uniform noise, constant colours, noisy and pixel-shuffled images."""
    n = len(test)
    return {"uniform noise": torch.rand(n, 3, 32, 32, generator=generator),
            "constant colour": torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, 32, 32),
            "average of two test images (IGEBM)": (test + test.roll(1, 0)) / 2,
            "gaussian noise 0.5 + 0.5 N(0, 1) (IGEBM)": 0.5 + 0.5 * torch.randn(test.shape, generator=generator),
            "heavy noise (sigma 0.3)": (test + 0.3 * torch.randn(test.shape, generator=generator)).clamp(0, 1),
            "shuffled pixels": torch.stack([x.flatten(1)[:, torch.randperm(1024, generator=generator)].view(3, 32, 32)
                                            for x in test])}


def evaluate(args):
    """FID / IS / KID of --n samples, energies of test images, samples and OOD sets, and AUROCs: RUN/eval.json."""
    device, _, _ = setup_device(args)
    dtype = amp_dtype(args, device)
    net, buffer = load_trained(args.eval, args, device)
    run_dir = Path(args.eval)
    test = test_subset(args, args.limit_test)
    svhn = load_svhn(args.data_root, len(test)) if args.ood == "svhn" else None  # fail before the slow part
    start = time.perf_counter()
    samples = draw_samples(net, buffer, args.n, args, device, dtype)
    sampling_seconds_per_1000 = 1000 * (time.perf_counter() - start) / args.n
    scores = common.generative_metrics(samples, args.data, args.data_root, args.fid_extractor, args.fid_weights,
                                       device)
    sets = {"test images": test, "samples": samples, **ood_sets(test, torch.Generator().manual_seed(args.seed))}
    if svhn is not None:
        sets["svhn"] = svhn
    energy = {name: energies_of(net, x, args, device, dtype) for name, x in sets.items()}
    aurocs = {name: auroc(-energy["test images"], -e) for name, e in energy.items()
              if name not in ("test images", "samples")}  # score = -E(x): high means in-distribution
    result = {**scores, "steps": args.steps, "chains": args.chains, "n_test": len(test),
              "sampling_seconds_per_1000": sampling_seconds_per_1000, "nfe_per_sample": args.steps,
              "energy": {k: {"mean": e.mean().item(), "std": e.std().item()} for k, e in energy.items()},
              "ood_auroc": aurocs}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, e in energy.items():
        ax.hist(e.numpy(), bins=40, alpha=0.5, density=True, label=name)
    ax.set_xlabel("energy E(x) (lower = more likely)"), ax.set_ylabel("density"), ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(run_dir / "eval_energies.png", dpi=100), plt.close(fig)

    print(f"{scores['n_samples']} samples ({args.chains} chains, {args.steps} SGLD steps), extractor "
          f"{scores['extractor']}: FID {scores['fid']:.2f}  IS {scores['is_mean']:.2f}  KID {scores['kid_mean']:.4f}")
    for name, e in energy.items():
        extra = f"  AUROC of -E vs test images {aurocs[name]:.3f}" if name in aurocs else ""
        print(f"  E({name}): {e.mean():.4f} +- {e.std():.4f}{extra}")
    print(f"wrote {run_dir / 'eval.json'} and {run_dir / 'eval_energies.png'}")
    return result


def inpaint(args, completions=3):
    """RUN/inpaint.png: the centre 16x16 of test images filled by SGLD on those pixels only."""
    device, _, _ = setup_device(args)
    net, _ = load_trained(args.inpaint, args, device)
    run_dir = Path(args.inpaint)
    test = test_subset(args, min(args.n, 10)).to(device)
    mask = torch.zeros(1, 1, 32, 32, device=device)
    mask[..., 8:24, 8:24] = 1  # 1 = unknown pixel
    torch.manual_seed(args.seed)
    rows = [("masked", test * (1 - mask) + 0.5 * mask)]
    for c in range(completions):
        start = torch.where(mask.bool(), torch.rand_like(test), test)
        with autocast(device, amp_dtype(args, device)):
            x, _, _ = sgld(lambda v: net(v).float(), start, args.steps, args.sgld_step_size, args.sgld_noise,
                           args.sgld_grad_clip, mask=mask)
        rows.append((f"completion {c + 1}", x))
    rows.append(("original", test))
    common.save_rows(rows, run_dir / "inpaint.png", title=f"inpainting by {args.steps} SGLD steps on the masked pixels")
    print(f"wrote {run_dir / 'inpaint.png'}")


# ----------------------------------------------------------------------------------------------
# The 2-D toy and the benchmark
# ----------------------------------------------------------------------------------------------
# The toy uses the same loss, sampler and replay buffer, but at temperature 1: step eps/2 and noise
# sqrt(eps) in Langevin proportion, no clipping, so that exp(-E) itself is the learned density. A
# small alpha lets energies span the ~15 nats between a mode and the gap next to it.
TOY = {"hidden": 128, "iterations": 3000, "batch": 128, "steps": 10, "eps": 0.005, "alpha": 0.001, "lr": 5e-3,
       "box": 4.0}


def train_toy(name, iterations=None, seed=1, steps=None, chains=None, restart_rate=0.05):
    """The toy energy and its replay buffer. steps and chains (SGLD steps, negatives per update) default to TOY's;
    restart_rate 1 makes every chain start from noise: short-run chains (Nijkamp et al. 2019), not persistent ones."""
    torch.manual_seed(seed)
    g, box = torch.Generator().manual_seed(seed), TOY["box"]
    net = toy_energy_net(TOY["hidden"])
    optimizer = torch.optim.Adam(net.parameters(), lr=TOY["lr"], betas=(0.0, 0.999))
    buffer = ReplayBuffer(10000, (2,), "cpu", restart_rate, low=-box, high=box)
    for _ in range(iterations or TOY["iterations"]):
        x_neg, idx = buffer.sample(chains or TOY["batch"])
        x_neg, _, _ = sgld(net, x_neg, steps or TOY["steps"], TOY["eps"] / 2, math.sqrt(TOY["eps"]), bounds=(-box, box))
        buffer.push(x_neg, idx)
        energies = net(torch.cat([common.toy_data(name, TOY["batch"], g), x_neg]))
        loss = contrastive_divergence_loss(energies[:TOY["batch"]], energies[TOY["batch"]:], TOY["alpha"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net, buffer


def toy(args):
    """A 2-D energy trained with the same loss, sampler and buffer: RUN/toy.png and toy.json."""
    run_dir = new_run_dir(args, "toy")
    start = time.perf_counter()
    net, buffer = train_toy(args.toy, seed=args.seed)
    wall = time.perf_counter() - start
    box, n = TOY["box"], 200
    axis = torch.linspace(-box, box, n)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        energy = net(grid).view(n, n)
        data = common.toy_data(args.toy, 2000, torch.Generator().manual_seed(0))
        e_on_data = net(data)
        e_data, e_noise = e_on_data.mean().item(), net(buffer.noise(2000, (2,), "cpu")).mean().item()
    density = torch.exp(-(energy - energy.min()))
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    axes[0].scatter(*data.T, s=2), axes[0].set_title(f"data: {args.toy}")
    axes[1].imshow(density.numpy(), extent=(-box, box, -box, box), origin="lower")
    axes[1].set_title("learned density exp(-E) (grid max = 1)")
    # CD learns where the modes are but barely their masses: persistent chains seldom cross between modes,
    # so exp(-E) can favour one mode by many nats while the samples still cover them all (Nijkamp et al. 2019)
    log_density = (-energy).clamp(min=-e_on_data.max().item())
    axes[2].imshow(log_density.numpy(), extent=(-box, box, -box, box), origin="lower")
    axes[2].set_title("log density -E (down to the data's highest E)")
    axes[3].scatter(*buffer.samples[:2000].T, s=2, color="tab:orange")
    axes[3].set_title(f"SGLD samples (replay buffer, K={TOY['steps']})")
    for ax in axes:
        ax.set_xlim(-box, box), ax.set_ylim(-box, box), ax.set_aspect("equal")
    fig.tight_layout(), fig.savefig(run_dir / "toy.png", dpi=100), plt.close(fig)
    result = {"data": args.toy, **TOY, "wall_s": wall, "mean_energy_data": e_data, "mean_energy_uniform": e_noise}
    (run_dir / "toy.json").write_text(json.dumps(result, indent=2))
    print(f"toy {args.toy}: {TOY['iterations']} iterations in {wall:.1f} s; mean E on data {e_data:.2f}, "
          f"on uniform noise over the box {e_noise:.2f}; figure {run_dir / 'toy.png'}")
    return run_dir


def bench(args, repeats=3):
    """Training steps (the real train_step: K SGLD steps and the update, same optimiser, precision and
    compilation) and sampled images per second, peak memory and projections: runs/ebm-bench__.../bench.json."""
    device, _, _ = setup_device(args)
    dtype = amp_dtype(args, device)
    torch.manual_seed(args.seed)
    net, optimizer, scaler = build(args, device)
    energy = torch.compile(net) if args.compile else net
    buffer = ReplayBuffer(max(args.batch_size, 256), (3, 32, 32), device, args.restart_rate)
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)

    def chains():  # as --sample runs them: dropout off, no gradients for the weights
        net.eval().requires_grad_(False)
        with autocast(device, dtype):
            sgld(lambda v: energy(v).float(), x, args.sgld_steps, args.sgld_step_size, args.sgld_noise,
                 args.sgld_grad_clip)

    train_s = seconds_per_call(lambda: train_step(energy, energy, net, optimizer, scaler, buffer, x, args, dtype),
                               repeats)
    sample_s = seconds_per_call(chains, 1)
    result = {**machine(device), "parameters": sum(p.numel() for p in net.parameters()), "width": args.width,
              "precision": str(dtype or torch.float32).removeprefix("torch."), "compile": args.compile,
              "batch_size": args.batch_size, "sgld_steps": args.sgld_steps, "train_step_s": train_s,
              "train_images_per_s": args.batch_size / train_s, "sample_images_per_s": args.batch_size / sample_s,
              "nfe_per_sample": args.sgld_steps,
              "projected_hours_200_epochs": 200 * 50_000 * train_s / args.batch_size / 3600}
    run_dir = new_run_dir(args, "bench")
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) + f"\nwrote {run_dir}/bench.json")
    return result


# ----------------------------------------------------------------------------------------------
# The run: device and precision, run folder, log, checkpoints (told the same way in all three model files)
# ----------------------------------------------------------------------------------------------

def setup_device(args):
    """(device, rank, world size). Under torchrun every process joins the group and takes its own GPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available() or name == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: not available on this machine")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if name == "cuda" else torch.device(name)
    if name == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # free speed on Ampere+
    if world > 1:
        dist.init_process_group("nccl" if name == "cuda" else "gloo", device_id=device if name == "cuda" else None)
    return device, rank, world


def amp_dtype(args, device):
    """The autocast precision, or None for float32. bf16 on GPUs built for it (compute capability 8 and up:
    A100, RTX 30xx/40xx, H100); float16 with a gradient scaler on older ones (T4, V100), where bf16 would be
    emulated, far slower; float32 on the CPU and MPS."""
    if not args.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def new_run_dir(args, kind=""):
    """runs/ebm__<name>__<seed>__<time>/ (ebm-bench__..., ebm-toy__... for those commands), made here."""
    model = f"ebm-{kind}" if kind else "ebm"
    run_dir = Path(args.run_dir) / f"{model}__{args.name}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        run_dir.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"--run-dir {args.run_dir}: cannot make {run_dir} ({e.strerror})") from None
    return run_dir


def open_run(args, step):
    """The run folder (new, or the one resumed) with config.json, and its log. Rank 0 only."""
    run_dir = Path(args.resume) if args.resume else new_run_dir(args)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    config = {"args": vars(args), "torch": torch.__version__, "cuda": torch.version.cuda, "git_commit": commit,
              "command": " ".join(sys.argv)}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    (run_dir / "checkpoint.pt.tmp").unlink(missing_ok=True)  # what a crash during a save leaves behind
    return run_dir, Log(run_dir, args, step)


class Log:
    """metrics.jsonl (one JSON object per row) and TensorBoard; Weights & Biases too with --track.

    On resume the rows after the checkpoint's step are dropped (and purged from TensorBoard): those
    steps are trained again, so the log reads as if the run had never stopped.
    """

    def __init__(self, run_dir, args, step):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        if step and self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.endswith("}")]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in rows if row["step"] <= step))
        self.tensorboard = SummaryWriter(run_dir, purge_step=step + 1 if step else None)
        self.wandb = None
        if args.track:
            import wandb

            self.wandb = wandb.init(project="cifar10-generative", name=run_dir.name, id=run_dir.name,
                                    resume="allow", config=vars(args))

    def __call__(self, step, **row):
        row = {"step": step, **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step":
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(row, step=step)

    def finish(self, summary):
        """summary.json and metrics.png, at the end of training."""
        (self.path.parent / "summary.json").write_text(json.dumps(summary, indent=2))
        common.plot_metrics(self.path.parent)
        self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def save_checkpoint(run_dir, **state):
    """checkpoint.pt, atomically: written to a temporary file, flushed to disk, then renamed over the old
    one, so that a crash during a save never destroys the last good checkpoint."""
    tmp = run_dir / "checkpoint.pt.tmp"
    with open(tmp, "wb") as f:
        torch.save({"model": "ebm", **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / "checkpoint.pt")


def load_checkpoint(run):
    """RUN/checkpoint.pt, read with weights_only=True: a file with pickled code in it is refused, not run."""
    path = Path(run) / "checkpoint.pt"
    if not path.is_file():
        raise UserError(f"no checkpoint.pt in {run}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = "it holds pickled objects other than tensors (refused)" if "Unsupported global" in str(e) else \
            "corrupt or truncated"
        raise UserError(f"cannot load {path}: {reason}") from None
    if not isinstance(ckpt, dict) or ckpt.get("model") != "ebm":
        raise UserError(f"{path} is not a checkpoint of ebm.py")
    missing = {"args", "net", "optimizer", "scaler", "buffer", "epoch", "step", "rollbacks"} - ckpt.keys()
    if missing:
        raise UserError(f"{path} is an incomplete checkpoint (it has no {', '.join(sorted(missing))})")
    return ckpt


def load_weights(module, state_dict, run):
    try:
        module.load_state_dict(state_dict)
    except RuntimeError:
        raise UserError(f"{run} holds a network of another width or architecture (see its config.json)") from None


def resume(args, net, optimizer, scaler, buffer, rank, world):
    """Load RUN/checkpoint.pt into the model and this rank's share of the replay buffer; returns (epoch, step,
    rollbacks). No random state is needed: every epoch reseeds from (seed, rank, epoch), so resuming at an
    epoch boundary redraws exactly the same noise."""
    ckpt = load_checkpoint(args.resume)
    if ckpt["epoch"] >= args.epochs:
        raise UserError(f"{args.resume} already has {ckpt['epoch']} epochs: pass --epochs N with N > {ckpt['epoch']}")
    load_weights(net, ckpt["net"], args.resume)
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    for p in net.parameters():  # moments laid out like their weights: a channels_last (GPU) checkpoint goes
        for key, value in optimizer.state[p].items():  # to the CPU, whose fused Adam assumes equal layouts
            if value.shape == p.shape:
                optimizer.state[p][key] = torch.empty_like(p).copy_(value)
    if args.lr != ckpt["args"]["lr"]:  # --lr given on resume wins over the optimiser's (perhaps rolled-back) one
        for group in optimizer.param_groups:
            group["lr"] = args.lr
    if ckpt["buffer"].shape[1:] != buffer.samples.shape[1:]:
        raise UserError(f"{args.resume}: its replay buffer holds samples of shape {tuple(ckpt['buffer'].shape[1:])}")
    buffer.samples = ckpt["buffer"].tensor_split(world)[rank].to(buffer.samples.device)  # any number of processes
    return ckpt["epoch"], ckpt["step"], ckpt["rollbacks"]


def seconds_per_call(fn, repeats):
    """Mean wall time of fn() after one warm-up call (allocator, cuDNN autotuning, compilation)."""
    fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def machine(device):
    """What a benchmark ran on, and its peak memory so far (GPU: allocated; CPU: resident set, Unix only)."""
    import resource

    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    return {"device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
            "torch": torch.__version__, "peak_memory_gib": peak / 2**30}


def main(argv=None):
    args = parse_args(argv)
    if args.toy:
        return toy(args)
    if args.sample:
        return sample(args)
    if args.eval:
        return evaluate(args)
    if args.inpaint:
        return inpaint(args)
    if args.bench:
        return bench(args)
    return train(args)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # bad input, or a run that diverged: one line on stderr and exit status 1
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the last checkpoint.pt is intact; continue with --resume RUN")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
