"""Noise Conditional Score Network (NCSN) with annealed Langevin dynamics, on CIFAR-10.

    python ncsn.py --epochs 200                     # NCSNv2's recipe on one GPU (--preset ncsn2019)
    python ncsn.py --sample runs/RUN --n 64         # samples.png, samples.npz, trajectory.png
    python ncsn.py --eval runs/RUN --sampler ode --nfe 57 --n 50000   # FID / IS / KID, test DSM
    torchrun --standalone --nproc_per_node=8 ncsn.py --epochs 200

The idea (Song & Ermon 2019, https://arxiv.org/abs/1907.05600). A generative model needs only the
*score* s(x) = grad_x log p(x): Langevin dynamics x <- x + alpha s(x) + sqrt(2 alpha) z samples p.
The score can be learned without knowing p, by *denoising score matching* (Vincent 2011): for x ~
data and x~ = x + sigma z the minimiser of 1/2 E ||s(x~, sigma) + z / sigma||^2 (-z / sigma is the
score of N(x~; x, sigma^2 I)) is the score of the blurred data p_sigma. Two problems remain: images
lie near a thin manifold where the data's score is undefined, and Langevin chains cannot cross the
empty gaps between modes, so they get the modes' weights wrong (experiments/ncsn_toy.py). Many
noise levels sigma_1 > ... > sigma_L solve both: large sigma fills space and joins modes, small
sigma is close to the data. One network learns every level, weighted by lambda(sigma) = sigma^2:

    loss = 1/2 E_{sigma, x, z} || sigma s(x + sigma z, sigma) + z ||^2          (NCSN eq. 6)

Annealed Langevin dynamics (NCSN Alg. 1) samples: T Langevin steps at each level, of size alpha_i =
eps sigma_i^2 / sigma_L^2, from the largest sigma to the smallest. NCSNv2 (Song & Ermon 2020,
https://arxiv.org/abs/2006.09011) made it work at scale, the defaults here: (1) sigma_1 about the
largest distance between training images (50); (2) a geometric ladder of many levels (L = 232); (3)
s = f(x) / sigma with f unconditional (--score-param unconditional; our default also tells f the
level: f(x, sigma) / sigma, as NCSN++); (4) T and eps that let the chains keep up with the shrinking
noise (T = 5, eps = 6.2e-6); (5) an exponential moving average (EMA) of the weights. A last step
x + sigma_L^2 s(x, sigma_L), Tweedie's formula for E[x | x~], removes the noise left. Reported on
CIFAR-10 (theirs): NCSN IS 8.87, FID 25.32; NCSNv2 FID 10.87, IS 8.40.

Blurring data by a growing sigma is a stochastic differential equation (the variance-exploding SDE,
Song et al. 2021, https://arxiv.org/abs/2011.13456). Its probability-flow ODE dx/dsigma = -sigma
s(x, sigma) has the same marginals p_sigma without noise: a deterministic sampler of the same
network (--sampler ode, --nfe) that Heun's method integrates in few steps (Karras et al. 2022).
"""

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import common
from common import UserError, decay, non_negative_float, positive_float, positive_int, run_name

MODEL = "ncsn"


# ----------------------------------------------------------------------------------------------
# The network: a U-Net s(x, sigma)
# ----------------------------------------------------------------------------------------------

def group_norm(channels):
    # GroupNorm, not BatchNorm: a sample's output must not depend on the rest of its batch
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the noise embedding added in between (DDPM's U-Net block)."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out) if emb_dim else None  # None: f(x) is unconditional
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # the block starts as its skip path (+ conv2's bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h if self.emb is None else h + self.emb(emb)[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h))) + self.skip(x)


class SigmaGroupNorm(nn.GroupNorm):
    """GroupNorm with a scale and shift set by the noise level: h -> norm(h) exp(a(emb)) + b(emb).
    For s = f(x, sigma) the last norm alone sets how large the score can be, and the true score
    grows as 1/sigma (5,000x from 50 to 0.01): NCSN 2019 conditions it (CondInstanceNorm++)."""

    def __init__(self, channels, emb_dim):
        super().__init__(math.gcd(32, channels), channels, affine=False)
        self.scale_shift = nn.Linear(emb_dim, 2 * channels)
        nn.init.zeros_(self.scale_shift.weight), nn.init.zeros_(self.scale_shift.bias)

    def forward(self, h, emb):
        # float32 under autocast too: bf16 rounds a log-scale a ~ 4.6 (a scale of 1 / sigma_L = 100)
        # by up to 0.016, which moves exp(a), and every score with it, by up to 1.6%
        with torch.autocast(h.device.type, enabled=False):
            log_scale, shift = self.scale_shift(emb.float())[:, :, None, None].chunk(2, dim=1)
        return super().forward(h) * log_scale.exp() + shift


class ScoreNet(nn.Module):
    """s(x, sigma) for images x (B, 3, 32, 32) and noise levels sigma (B,): a U-Net (DDPM, NCSN++),
    not the papers' RefineNet: it sees the whole image at 4x4, keeps 32x32 detail through its skip
    connections, and is faster per parameter. The true score's size is about 1/sigma; score_param:
      'divide'         f(x, sigma) / sigma, f told sigma by an embedding in every block (default)
      'unconditional'  f(x) / sigma, f never told sigma (NCSNv2's technique 3, as its code)
      'embed'          f(x, sigma), which must grow as 1/sigma by itself (NCSN 2019)"""

    def __init__(self, width=112, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                 score_param="divide"):
        super().__init__()
        self.width, self.score_param = width, score_param
        emb_dim = 0 if score_param == "unconditional" else 4 * width
        self.embed = None if not emb_dim else \
            nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.head = nn.Conv2d(3, width, 3, padding=1)
        self.down, skips, ch = nn.ModuleList(), [width], width
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, width * mult, emb_dim))
                ch = width * mult
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # halve the resolution
                skips.append(ch)
        self.middle = nn.ModuleList([ResBlock(ch, ch, emb_dim), ResBlock(ch, ch, emb_dim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skips.pop(), width * mult, emb_dim))
                ch = width * mult
            if level > 0:  # double the resolution
                upsample = nn.Upsample(scale_factor=2)
                self.up.append(nn.Sequential(upsample, nn.Conv2d(ch, ch, 3, padding=1)))
        norm = SigmaGroupNorm(ch, emb_dim) if score_param == "embed" else group_norm(ch)
        self.out = nn.Sequential(norm, nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)

    def forward(self, x, sigma):
        emb = None  # sinusoidal features of log sigma (as transformers embed positions), an MLP
        if self.embed is not None:
            frequencies = torch.logspace(-1, 2.5, self.width // 2, device=x.device)
            angles = sigma.log()[:, None] * frequencies
            emb = self.embed(torch.cat([angles.sin(), angles.cos()], dim=1))  # (B, 4 width)
        sigma = sigma[:, None, None, None]
        # The input, centred, over sqrt(sigma^2 + 1/4) (Karras et al.'s c_in: of order one at every
        # level). The first conv in float32: bf16 rounds a pixel near 1 by up to 0.002, a fifth of
        # sigma_L = 0.01 (the score's error at sigma_L: 1.2% -> 4.1%, measured on a trained model).
        with torch.autocast(x.device.type, enabled=False):
            x = x.float() - 0.5
            h = self.head(x if emb is None else x / (sigma.float() ** 2 + 0.25).sqrt())
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for block in self.middle:
            h = block(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), emb) if isinstance(layer, ResBlock) else layer(h)
        norm, act, conv = self.out
        if self.score_param == "embed":
            return conv(act(norm(h, emb)))
        return conv(act(norm(h))) / sigma  # (B, 3, 32, 32)


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------

def geometric_sigmas(sigma_max, sigma_min, num_scales):
    """sigma_1 > ... > sigma_L with a constant ratio (NCSNv2 technique 2)."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_scales))


def dsm_loss(score_net, x, sigmas, levels=None, noise=None):
    """Per-example denoising score matching, 1/2 ||sigma s(x + sigma z, sigma) + z||^2 (NCSN eq. 6).
    lambda = sigma^2 puts the levels on one scale: a zero score scores D/2 at every level, and the
    optimum is D/2 minus what the level lets the network predict. One level per example, uniform."""
    if levels is None:
        levels = torch.randint(len(sigmas), (len(x),), device=x.device)
    sigma = sigmas[levels].view(-1, *[1] * (x.dim() - 1))  # (B, 1, 1, 1) for images
    z = torch.randn_like(x) if noise is None else noise
    score = score_net(x + sigma * z, sigma.flatten()).float()
    return 0.5 * (sigma * score + z).pow(2).flatten(1).sum(1)


# ----------------------------------------------------------------------------------------------
# The samplers: from a draw of about p_sigma_1 down to p_sigma_L
# ----------------------------------------------------------------------------------------------

def gaussian_start(stats, sigma_1, device):
    """Where the samplers start: N(mean, C + sigma_1^2 I), C the data's covariance: p_sigma_1's mean
    and covariance. At sigma_1 = 50 it is noise, as the papers' uniform start (CIFAR-10's widest
    direction has a std of 7.7); at NCSN 2019's sigma_1 = 1 the data's shape matters, and the ODE
    cannot correct a start that misses it. Returns a function n -> n draws."""
    cov = stats["cov"].double() + sigma_1**2 * torch.eye(len(stats["cov"]), dtype=torch.float64)
    root, mean = torch.linalg.cholesky(cov).float().to(device), stats["mean"].to(device)
    return lambda n: mean + (torch.randn(n, len(root), device=device) @ root.T).view(n, *mean.shape)


def annealed_langevin(score_net, x, sigmas, steps, eps, denoise=True):
    """Annealed Langevin dynamics (NCSN Alg. 1; Alg. 2, inpainting: experiments/ncsn_inpaint.py).
    x <- x + alpha s + sqrt(2 alpha) z, as the papers' code (Alg. 1 writes alpha / 2 for alpha);
    alpha_i = eps sigma_i^2 / sigma_L^2 keeps each update's signal-to-noise ratio the same at every
    level. Costs len(sigmas) x steps (+ 1 to denoise) network evaluations."""
    for sigma in sigmas:
        alpha = eps * (sigma / sigmas[-1]) ** 2
        for _ in range(steps):
            score = score_net(x, sigma.expand(len(x))).float()
            x = x + alpha * score + (2 * alpha).sqrt() * torch.randn_like(x)
    return finish(score_net, x, sigmas[-1], denoise)


def finish(score_net, x, sigma_min, denoise):
    """Tweedie's formula E[x_clean | x] = x + sigma^2 grad log p_sigma(x): the final denoising."""
    return x + sigma_min**2 * score_net(x, sigma_min.expand(len(x))).float() if denoise else x


def probability_flow(score_net, x, sigmas, denoise=True):
    """The probability-flow ODE dx/dsigma = -sigma s(x, sigma) by Heun's method (Karras et al.
    2022): an Euler step, then the mean of the slopes at its two ends. Deterministic: each point of
    p_sigma_1 is carried to one of p_sigma_L. Costs 2 len(sigmas) - 2 (+ 1 to denoise: the Euler
    step to sigma = 0) network evaluations."""
    def slope(x, sigma):
        return -sigma * score_net(x, sigma.expand(len(x))).float()

    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = slope(x, sigma)
        x_euler = x + (sigma_next - sigma) * d
        x = x + (sigma_next - sigma) * (d + slope(x_euler, sigma_next)) / 2
    return finish(score_net, x, sigmas[-1], denoise)


def langevin_variance_ratio(eps, steps, gamma, sigma_min):
    """Technique 4: variance / sigma_i^2 of the chains at the end of a level, for data at a point
    x*. A step is x - x* <- a (x - x*) + sqrt(2 alpha) z, a = 1 - b, b = eps / sigma_L^2 (the same
    at every level), fixed point c = 2 / (2 - b). NCSNv2 starts each level in equilibrium at the
    last sigma (ratio gamma^2, gamma = sigma_i-1 / sigma_i): a^2T (gamma^2 - c) + c. But the excess
    carries over: the ratio settles at r = a^2T (gamma^2 r - c) + c = c (1 - a^2T) / (1 - gamma^2
    a^2T). langevin_eps: the eps with r closest to 1 (from above) at a ladder's largest gap."""
    b = eps / sigma_min**2
    shrink = (1 - b) ** (2 * steps)  # a^2T
    return 2 / (2 - b) * (1 - shrink) / (1 - gamma**2 * shrink)


def langevin_eps(sigmas, steps):
    gamma, sigma_min = (sigmas[:-1] / sigmas[1:]).max().item(), sigmas[-1].item()
    b = torch.logspace(-4, 0, 4000, dtype=torch.float64)  # candidates for eps / sigma_L^2
    ratio = langevin_variance_ratio(b * sigma_min**2, steps, gamma, sigma_min)
    ratio[gamma**2 * (1 - b) ** (2 * steps) >= 1] = math.inf  # these chains diverge
    return (b[ratio.argmin()] * sigma_min**2).item()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def build(args, device):
    """The score network (channels_last on a GPU: faster), its EMA, the optimiser, the scaler."""
    mult = tuple(int(m) for m in str(args.channel_mult).split(","))
    net = ScoreNet(args.width, mult, args.num_res_blocks, args.score_param).to(device)
    net = net.to(memory_format=torch.channels_last) if device.type == "cuda" else net
    ema = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, fused=True)
    return net, ema, optimizer, grad_scaler(device, amp_dtype(args, device))


@torch.no_grad()  # the average is not part of any graph (under autograd it would grow every step)
def update_ema(ema, net, decay, step):
    """ema <- d ema + (1 - d) net with d = min(decay, (1 + step) / (10 + step)): early on the
    average forgets its random start quickly (NCSNv2 technique 5)."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p, 1 - d)


def train_step(model, net, optimizer, scaler, x, sigmas, args, dtype):
    """One Adam step on the DSM loss of a batch x (B, 3, 32, 32) in [0, 1]. Returns ({name: device
    tensor} to log, a device bool: the loss is not finite, the sign of a divergence)."""
    with autocast(x.device, dtype):
        loss = dsm_loss(model, x, sigmas).mean()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # the gradients' true size (under float16) before clipping
    grad_norm = nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip or math.inf)
    scaler.step(optimizer)  # skipped if a gradient is not finite
    scaler.update()
    return {"loss": loss.detach(), "grad_norm": grad_norm}, ~torch.isfinite(loss)


def data_statistics(images, device):
    """Mean (3, 32, 32) and covariance (3072, 3072) of uint8 images: where the samplers start."""
    x = images.to(device).flatten(1).float() / 255
    return {"mean": x.mean(0).view(images.shape[1:]).cpu(), "cov": x.T.cov().cpu()}


@torch.inference_mode()
def test_metrics(net, images, sigmas, args, device, dtype):
    """The test DSM loss with fixed noise, in all and per quarter of the levels (q1: the largest
    sigmas); test image i is at one level of quarter i mod 4."""
    g, quarters = torch.Generator(device=device).manual_seed(1234), min(4, len(sigmas))
    x, sigmas = images.to(device).float() / 255, sigmas.to(device)
    quarter = torch.arange(len(x), device=device) % quarters
    edges = torch.linspace(0, len(sigmas), quarters + 1, device=device)
    u = torch.rand(len(x), generator=g, device=device)
    levels = (edges[quarter] + u * (edges[quarter + 1] - edges[quarter])).long()
    noise = torch.randn(x.shape, generator=g, device=device)
    with autocast(device, dtype):
        loss = torch.cat([dsm_loss(net, xb, sigmas, lb, zb) for xb, lb, zb in zip(
            x.split(args.batch_size), levels.split(args.batch_size), noise.split(args.batch_size))])
    return {"test_dsm": loss.mean().item(),
            **{f"test_dsm_q{q + 1}": loss[quarter == q].mean().item() for q in range(quarters)}}


def preview_args(args):
    """The previews' sampler: the probability-flow ODE on a budget of 50 network evaluations (49
    used; an 'embed' network: its own levels at most): a Gaussian's spread within 2% (tested)."""
    nfe = min(50, network_evaluations("ode", args.num_scales, 1, args.denoise))
    return argparse.Namespace(**{**vars(args), "sampler": "ode", "nfe": nfe})


def write_previews(net, stats, run_dir, epoch, args, device, dtype):
    """samples/epoch_NNNN.png: the preview sampler from the same 64 starts every epoch."""
    torch.manual_seed(0)
    x, nfe = draw_samples(net, stats, 64, preview_args(args), device, dtype)
    common.save_grid(x, run_dir / "samples" / f"epoch_{epoch:04d}.png",
                     caption=f"epoch {epoch}: {SAMPLERS['ode']}, {nfe} network evaluations")


def train(args):
    device, rank, world = setup_device(args)  # device and DDP
    dtype = amp_dtype(args, device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP checks it)
    train_images = common.load_images(args.data, args.data_root, "train")[:args.limit_train]
    test_images = common.load_images(args.data, args.data_root, "test")[:args.limit_test]
    loader = common.DeviceLoader(train_images, args.batch_size // world, device, args.seed, rank,
                                 world)
    net, ema, optimizer, scaler = build(args, device)
    model = torch.compile(net) if args.compile else net
    model = DistributedDataParallel(model) if world > 1 else model
    start, step, stats = resume(args, net, ema, optimizer, scaler) if args.resume else \
        (0, 0, data_statistics(train_images, device))
    sigmas = geometric_sigmas(args.sigma_max, args.sigma_min, args.num_scales).to(device)
    run_dir, log = open_run(args, step) if rank == 0 else (None, None)
    if rank == 0:
        print(f"{run_dir}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_images)} images, {len(loader)} steps an epoch on {device} x {world}, "
              f"{dtype or torch.float32}; sigma_1 {args.sigma_max:g}: the largest distance between "
              f"training images is {common.largest_distance(train_images, 2000):.1f} (technique 1)")
        if step == 0:  # the baseline: the initial score is near 0 (a zero score: D/2 = 1536)
            log(0, epoch=0, **test_metrics(ema, test_images, sigmas, args, device, dtype))
    streak = worst = torch.zeros((), device=device)  # divergence signs in a row, on the device
    for epoch in range(start + 1, args.epochs + 1):
        torch.manual_seed(args.seed * 10**9 + rank * 10**6 + epoch)  # each rank's and epoch's noise
        tick = time.perf_counter()
        for i, x in enumerate(tqdm(loader.epoch(epoch), f"epoch {epoch}", len(loader), leave=False,
                                   disable=rank != 0)):  # x: (B, 3, 32, 32) in [0, 1]
            logs, bad = train_step(model, net, optimizer, scaler, x, sigmas, args, dtype)
            update_ema(ema, net, args.ema, step)
            step, streak = step + 1, (streak + 1) * bad
            worst = torch.maximum(worst, streak)
            if step % args.log_every == 0 or i == len(loader) - 1:  # the only host syncs
                if worst.item() >= args.max_bad_steps:
                    raise UserError(f"training diverged: a non-finite loss {args.max_bad_steps} "
                                    f"steps in a row by step {step}; the last good checkpoint is "
                                    f"in {args.resume or run_dir}: resume it with a lower --lr")
                if rank == 0:
                    log(step, epoch=epoch, **{k: v.item() for k, v in logs.items()}, lr=args.lr,
                        img_per_s=(i + 1) * args.batch_size / (time.perf_counter() - tick))
        if rank == 0:  # end of epoch: evaluate, preview, checkpoint
            seconds = time.perf_counter() - tick
            test = test_metrics(ema, test_images, sigmas, args, device, dtype)
            write_previews(ema, stats, run_dir, epoch, args, device, dtype)
            log(step, epoch=epoch, epoch_seconds=seconds, **test)
            save_checkpoint(run_dir, args=vars(args), net=net.state_dict(), ema=ema.state_dict(),
                            optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                            precision=str(dtype), epoch=epoch, step=step, state=stats)
            print(f"epoch {epoch}/{args.epochs}: test DSM {test['test_dsm']:.2f}, {seconds:.0f} s")
        if world > 1:  # (if rank 0 failed above, torchrun stops the other processes)
            dist.barrier()
    if rank == 0:
        log.finish({"epochs": args.epochs, "steps": step, **test,
                    "parameters": sum(p.numel() for p in net.parameters())})
    return run_dir


# ----------------------------------------------------------------------------------------------
# Commands: sample, evaluate
# ----------------------------------------------------------------------------------------------

def load_trained(run, args, device):
    """The run's EMA network, ready to sample, and its state (the data's mean and covariance)."""
    net, _, _, _ = build(args, device)
    ckpt = load_checkpoint(run, ema=net)
    return net.eval().requires_grad_(False), ckpt["state"]


def sampler_levels(args):
    """(sigmas, steps per level, eps) of --sampler for a budget of --nfe network evaluations.
    Without --nfe: the run's L levels (ald: T steps at each). With it: as many levels as it buys,
    evenly spaced in log sigma (an 'embed' network knows only the sigmas it was trained at: rungs of
    its ladder, as even as it allows). eps: --step-eps, else the paper's on its ladder, else
    technique 4's for these levels."""
    budget, steps = None if args.nfe is None else args.nfe - args.denoise, args.steps_per_level
    steps = steps if args.sampler == "ald" else 1
    levels = args.num_scales if budget is None else \
        (budget // steps if args.sampler == "ald" else budget // 2 + 1)
    sigmas = geometric_sigmas(args.sigma_max, args.sigma_min, args.num_scales)
    if levels != args.num_scales and args.score_param == "embed":
        sigmas = sigmas[torch.linspace(0, args.num_scales - 1, levels).round().long()]
    elif levels != args.num_scales:
        sigmas = geometric_sigmas(args.sigma_max, args.sigma_min, levels)
    paper = PRESETS[args.preset]
    if args.step_eps or [args.sigma_max, args.sigma_min, levels, steps] == \
            [paper[k] for k in ("sigma_max", "sigma_min", "num_scales", "steps_per_level")]:
        return sigmas, steps, args.step_eps or paper["step_eps"]
    return sigmas, steps, langevin_eps(sigmas, steps) if len(sigmas) > 1 else None


SAMPLERS = {"ald": "annealed Langevin", "ode": "probability-flow ODE"}


def network_evaluations(sampler, levels, steps, denoise):
    """A sample's cost: T Langevin steps a level (ald), or two a Heun step between levels (ode)."""
    return (levels * steps if sampler == "ald" else 2 * levels - 2) + denoise


@torch.inference_mode()
def draw_samples(net, stats, n, args, device, dtype, levels=None):
    """(n samples on the CPU, unclamped; network evaluations per sample) of --sampler in batches of
    --batch-size, each from a Gaussian start; levels: stop after that many levels, no denoising."""
    sigmas, steps, eps = sampler_levels(args)
    sigmas, denoise, out = sigmas[:levels].to(device), args.denoise and levels is None, []
    start = gaussian_start(stats, sigmas[0].item(), device)
    for i in range(0, n, args.batch_size):
        x = start(min(args.batch_size, n - i))
        with autocast(device, dtype):
            if args.sampler == "ald":
                x = annealed_langevin(net, x, sigmas, steps, eps, denoise)
            else:
                x = probability_flow(net, x, sigmas, denoise)
        out.append(x.float().cpu())
    return torch.cat(out), network_evaluations(args.sampler, len(sigmas), steps, denoise)


def sample(args):
    """RUN/samples.png, samples.npz (uint8, NHWC) and trajectory.png: eight chains level by level,
    the same draws replayed up to eight levels (the same seed draws the same noise)."""
    device, _, _ = setup_device(args)
    dtype, (net, stats) = amp_dtype(args, device), load_trained(args.sample, args, device)
    torch.manual_seed(args.seed)
    x, nfe = draw_samples(net, stats, args.n, args, device, dtype)
    run, what = Path(args.sample), f"{SAMPLERS[args.sampler]}, {nfe} network evaluations each"
    common.save_grid(x, run / "samples.png", caption=f"{args.n} samples: {what}")
    np.savez_compressed(run / "samples.npz", samples=common.to_uint8(x).permute(0, 2, 3, 1).numpy())
    sigmas, rows = sampler_levels(args)[0], []
    eight = argparse.Namespace(**{**vars(args), "batch_size": 8})
    for level in [*sorted({round(1 + i * (len(sigmas) - 1) / 6) for i in range(7)}), None]:
        torch.manual_seed(args.seed)  # the same draws, up to that level
        label = "final" if level is None else f"sigma={sigmas[level - 1]:.3g}"
        rows.append((label, draw_samples(net, stats, 8, eight, device, dtype, levels=level)[0]))
    common.save_rows(rows, run / "trajectory.png", title=f"{what}: eight chains, level by level")
    print(f"wrote {args.n} samples to {run}/samples.png, samples.npz and trajectory.png ({what})")


def evaluate(args):
    """FID / IS / KID of --n samples, and the test DSM loss, into RUN/eval.json."""
    common.check_metrics(args.n, args.fid_extractor, args.fid_weights)  # before any sampling
    device, _, _ = setup_device(args)
    dtype, (net, stats) = amp_dtype(args, device), load_trained(args.eval, args, device)
    torch.manual_seed(args.seed)
    tick = time.perf_counter()
    x, nfe = draw_samples(net, stats, args.n, args, device, dtype)
    seconds = time.perf_counter() - tick
    result = common.generative_metrics(x, args.data, args.data_root, args.fid_extractor,
                                       args.fid_weights, device)
    test_images = common.load_images(args.data, args.data_root, "test")[:args.limit_test]
    sigmas = geometric_sigmas(args.sigma_max, args.sigma_min, args.num_scales)
    result.update(test_metrics(net, test_images, sigmas, args, device, dtype), sampler=args.sampler,
                  nfe_per_sample=nfe, sampling_seconds_per_1000=1000 * seconds / args.n)
    (Path(args.eval) / "eval.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


PRESETS = {  # what each paper fixes; a flag given on the command line wins
    "ncsnv2": dict(sigma_max=50.0, sigma_min=0.01, num_scales=232, steps_per_level=5,
                   step_eps=6.2e-6, lr=1e-4, ema=0.999, denoise=True, score_param="divide",
                   grad_clip=1.0),  # (score-SDE's clip: neither paper's code clips)
    "ncsn2019": dict(sigma_max=1.0, sigma_min=0.01, num_scales=10, steps_per_level=100,
                     step_eps=2e-5, lr=1e-3, ema=0.0, denoise=False, score_param="embed",
                     grad_clip=0.0)}
RECIPE = dict(epochs=200)  # (the rest comes from --preset)
COMMANDS = ("resume", "sample", "eval")  # the flags that name a run


def add_model_args(p):
    add = p.add_argument
    add("--preset", choices=PRESETS, default="ncsnv2", help="a paper's recipe: ncsnv2, ncsn2019")
    add("--width", type=positive_int, default=112, help="channels at 32x32 (112: 26.2M parameters)")
    add("--channel-mult", default="1,2,2,2", help="channel multipliers at 32, 16, 8, 4 pixels")
    add("--num-res-blocks", type=positive_int, default=2, help="residual blocks per resolution")
    add("--score-param", choices=["divide", "unconditional", "embed"], help="see ScoreNet")
    add("--sigma-max", type=positive_float, help="the largest noise level sigma_1")
    add("--sigma-min", type=positive_float, help="the smallest noise level sigma_L")
    add("--num-scales", type=positive_int, help="the number of noise levels L")
    add("--steps-per-level", type=positive_int, help="ald: Langevin steps T per level")
    add("--step-eps", type=positive_float, help="ald: eps of alpha_i = eps sigma_i^2 / sigma_L^2")
    add("--denoise", action=argparse.BooleanOptionalAction, help="the final denoising step")
    add("--sampler", choices=SAMPLERS, default="ald", help=str(SAMPLERS))
    add("--nfe", type=positive_int, help="network evaluations a sample (default: every level)")


def check_model_args(args, error):
    for key, value in PRESETS[args.preset].items():  # the preset fills what is still unset
        if getattr(args, key) is None and key != "step_eps":  # (step_eps: see sampler_levels)
            setattr(args, key, value)
    mult = str(args.channel_mult).split(",")
    if args.width % 2 or not all(m.isdigit() and int(m) > 0 for m in mult) or len(mult) > 5:
        error(f"--width must be even and --channel-mult 1 to 5 positive integers such as 1,2,2,2; "
              f"got --width {args.width} --channel-mult {args.channel_mult}")
    if args.sigma_min >= args.sigma_max or args.num_scales < 2:
        error(f"the noise anneals from --sigma-max down to --sigma-min over --num-scales >= 2 "
              f"levels; got {args.sigma_max:g}, {args.sigma_min:g}, {args.num_scales}")
    levels = len(sampler_levels(args)[0]) if args.nfe else args.num_scales
    least, most = (network_evaluations(args.sampler, n, args.steps_per_level, args.denoise)
                   for n in (2, args.num_scales))
    if levels < 2:
        error(f"--nfe {args.nfe}: --sampler {args.sampler} needs two levels at least: --nfe "
              f"{least} or more")
    if levels > args.num_scales and args.score_param == "embed":
        error(f"--nfe {args.nfe}: an 'embed' network knows its {args.num_scales} levels only (it "
              f"has not learned the others): --nfe {most} at most")


# ----------------------------------------------------------------------------------------------
# The run: arguments, device and precision, run folder and log, checkpoint and resume. The same
# text in vae.py, ebm.py and ncsn.py: `diff` two of them and this part shows nothing.
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    """The flags every model file shares, then the model's own. A command that names a RUN takes
    every flag not given from RUN/config.json (`--resume RUN --epochs 300` keeps its width, ...)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage=argparse.SUPPRESS)
    add = p.add_argument  # (no usage block: a bad flag gets one line and exit status 2)
    add("--epochs", type=positive_int, help="passes over the training set")
    add("--batch-size", type=positive_int, default=128, help="images per step and per batch")
    add("--lr", type=positive_float, help="learning rate")
    add("--seed", type=int, default=1, help="random seed of weights, noise and samples")
    add("--device", choices=["auto", "cuda", "cpu", "mps"], default="auto", help="where to run")
    add("--data", default="cifar10", help="'cifar10' or any folder of images")
    add("--data-root", default="data", help="where CIFAR-10 and decoded-image caches live")
    add("--run-dir", default="runs", help="parent folder of run folders")
    add("--name", type=run_name, default="default", help="run name, part of the run folder's name")
    add("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision (CUDA)")
    add("--compile", action="store_true", help="torch.compile the network")
    add("--track", action="store_true", help="also log to Weights & Biases (needs wandb)")
    add("--limit-train", type=positive_int, help="use only the first N training images")
    add("--limit-test", type=positive_int, help="use only the first N test images")
    add("--log-every", type=positive_int, default=50, help="steps between host-synced logs")
    add("--ema", type=decay, help="decay of the weights' moving average that samples (0: none)")
    add("--grad-clip", type=non_negative_float, help="clip the gradient's norm to this (0: off)")
    add("--max-bad-steps", type=positive_int, default=50, help="bad steps in a row that stop a run")
    add("--resume", metavar="RUN", help="continue the run in this folder (--epochs N extends it)")
    add("--sample", metavar="RUN", help="write --n samples to RUN/samples.png and samples.npz")
    add("--eval", metavar="RUN", help="FID / IS / KID of --n samples and the model's own metrics")
    add("--n", type=positive_int, default=64, help="samples for --sample and --eval")
    add("--fid-extractor", default="inception-v3-compat", help="torch-fidelity feature extractor")
    add("--fid-weights", metavar="FILE", help="Inception weights file, for a machine offline")
    add_model_args(p)
    p.set_defaults(**RECIPE)
    args = p.parse_args(argv)
    if run := next((getattr(args, c) for c in COMMANDS if getattr(args, c)), None):
        try:
            saved = json.loads((Path(run) / "config.json").read_text())["args"]
            p.set_defaults(**{k: v for k, v in saved.items() if k not in COMMANDS})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{run} is not a run folder (no readable config.json)") from None
        args = p.parse_args(argv)
    check_model_args(args, p.error)
    if args.track and importlib.util.find_spec("wandb") is None:
        p.error("--track needs wandb: pip install wandb")
    return args


def setup_device(args):
    """(device, rank, world size). Under torchrun every process joins the group with its own GPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    found = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    name = next((n for n in found if found[n]), "cpu") if args.device == "auto" else args.device
    if not found.get(name, True):
        raise UserError(f"--device {name}: not available on this machine")
    device = torch.device(name, int(os.environ.get("LOCAL_RANK", 0)) if name == "cuda" else None)
    if name == "cuda":  # (TF32 as torch sets it: on in cuDNN's float32 convolutions only)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN may pick its fastest kernels
    if world > 1:  # (torch.distributed.nn before the group: its functions' defaults, group=WORLD,
        # would hold the group past destroy_process_group if DDP imported it later, and gloo's
        # threads, alive at exit, abort a finished run now and then)
        importlib.import_module("torch.distributed.nn")
        dist.init_process_group("nccl" if name == "cuda" else "gloo",
                                device_id=device if name == "cuda" else None)
    return device, rank, world


def amp_dtype(args, device):
    """The autocast precision (None: float32): bf16 on GPUs built for it (compute capability 8+),
    float16 on T4 and V100 (7.x: bf16 would be emulated), float32 on older GPUs and elsewhere."""
    capability = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
    return None if not args.amp or capability < 7 else \
        torch.bfloat16 if capability >= 8 else torch.float16


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device, dtype):
    """Its step() skips an update whose gradients are not finite; under float16 it also scales the
    loss so that small gradients do not round to zero. Elsewhere its scale stays 1: it backs off by
    1 - 2^-24, not by half (after 150 halvings the scale is 0, and the weights become NaN)."""
    fp16 = dtype == torch.float16
    return torch.amp.GradScaler(device.type, init_scale=2.0**16 if fp16 else 1.0,
                                backoff_factor=0.5 if fp16 else 1 - 2**-24,
                                growth_interval=2000 if fp16 else 2**31 - 1)


def new_run_dir(args, kind=""):
    """runs/<model>__<name>__<seed>__<time>/ (<model>-<kind>__... for a command's output)."""
    name = f"{MODEL}-{kind}__{args.name}" if kind else f"{MODEL}__{args.name}"
    run_dir = Path(args.run_dir) / f"{name}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        run_dir.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"--run-dir {args.run_dir}: cannot make {run_dir} ({e.strerror})") from None
    return run_dir


LOCKS = {}  # run folder -> its lock file, held open while this process writes the run


def open_run(args, step):
    """The run folder (new, or resumed) with config.json and its log, locked to one writer: RUN/lock
    names its process, and the lock dies with it, so a killed run never blocks --resume."""
    run_dir = Path(args.resume) if args.resume else new_run_dir(args)
    if old := LOCKS.pop(run_dir.resolve(), None):  # this process wrote the run before (a notebook)
        old.close()
    lock = LOCKS[run_dir.resolve()] = open(run_dir / "lock", "a+")
    with contextlib.suppress(ImportError):
        import fcntl

        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            raise UserError(f"{run_dir} is being written by process {lock.read().strip()}: one "
                            "writer at a time") from None
    lock.truncate(0), lock.write(f"{os.getpid()}\n"), lock.flush()
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True,
                         capture_output=True) if shutil.which("git") else None
    config = {"args": vars(args), "torch": torch.__version__, "cuda": torch.version.cuda,
              "command": sys.argv, "git_commit": git.stdout.strip() or None if git else None}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    (run_dir / "checkpoint.pt.tmp").unlink(missing_ok=True)  # what a crash during a save left
    return run_dir, Log(run_dir, args, step)


class Log:
    """metrics.jsonl (a JSON object per row), TensorBoard, and with --track Weights & Biases. On
    resume the rows after the checkpoint's step go (TensorBoard's too): they are trained again."""

    def __init__(self, run_dir, args, step):
        from torch.utils.tensorboard import SummaryWriter

        self.path, self.wandb = run_dir / "metrics.jsonl", None  # wandb: only with --track
        if step and self.path.exists():
            rows = [json.loads(r) for r in self.path.read_text().splitlines() if r.endswith("}")]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
        self.tensorboard = SummaryWriter(run_dir, purge_step=step + 1 if step else None)
        if args.track:  # (the run folder's name is its id: a resumed run continues its curves)
            self.wandb = importlib.import_module("wandb").init(
                project="cifar10-generative", name=run_dir.name, id=run_dir.name, resume="allow",
                config=vars(args))

    def __call__(self, step, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")
        for key, value in row.items():
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
    """checkpoint.pt, atomically (a temporary file, flushed, renamed): a crash never destroys it."""
    with open(run_dir / "checkpoint.pt.tmp", "wb") as f:
        torch.save({"model": MODEL, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(run_dir / "checkpoint.pt.tmp", run_dir / "checkpoint.pt")


def load_checkpoint(run, **modules):
    """RUN/checkpoint.pt (weights_only: pickled code is refused, not run) into modules (net=...)."""
    path = Path(run) / "checkpoint.pt"
    try:
        with warnings.catch_warnings():  # (a corrupt file may read as an unknown pickle protocol,
            warnings.simplefilter("ignore")  # which torch warns about before it fails)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint.pt in {run}") from None
    except Exception as e:
        why = "it holds pickled objects other than tensors (refused)" \
            if "Unsupported global" in str(e) else "corrupt or truncated"
        raise UserError(f"cannot load {path}: {why}") from None
    if not isinstance(ckpt, dict) or ckpt.get("model") != MODEL:
        raise UserError(f"{path} is not a checkpoint of {MODEL}.py")
    needed = {"args", "net", "ema", "optimizer", "scaler", "precision", "epoch", "step", "state"}
    if missing := needed - {*ckpt}:
        raise UserError(f"{path} is an incomplete checkpoint (no {', '.join(sorted(missing))})")
    try:
        for key, module in modules.items():
            module.load_state_dict(ckpt[key])
    except RuntimeError:
        raise UserError(f"{run} holds a network of another width or architecture (its config.json "
                        "says which)") from None
    return ckpt


def resume(args, net, ema, optimizer, scaler):
    """Load RUN/checkpoint.pt into the model; returns (epoch, step, the model's own state). No
    random state is saved: every epoch reseeds from (seed, rank, epoch), so resuming at an epoch
    boundary draws the same noise. A run may move between GPUs, precisions and the CPU."""
    ckpt = load_checkpoint(args.resume, net=net, ema=ema)
    if ckpt["epoch"] >= args.epochs:
        raise UserError(f"{args.resume} already has {ckpt['epoch']} epochs: pass --epochs N with "
                        f"N > {ckpt['epoch']}")
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["precision"] == str(amp_dtype(args, next(net.parameters()).device)):
        scaler.load_state_dict(ckpt["scaler"])  # (in another precision the scaler starts afresh)
    for p in net.parameters():  # moments laid out as their weights: a channels_last (GPU)
        for key, value in optimizer.state[p].items():  # checkpoint on the CPU's fused Adam needs it
            if value.shape == p.shape:
                optimizer.state[p][key] = torch.empty_like(p).copy_(value)
    if args.lr != ckpt["args"]["lr"]:  # a --lr given on resume wins over the saved one
        for group in optimizer.param_groups:
            group["lr"] = args.lr
    return ckpt["epoch"], ckpt["step"], ckpt["state"]


def main(argv=None):
    args = parse_args(argv)
    for command, run in (("sample", sample), ("eval", evaluate)):
        if getattr(args, command):
            return run(args)
    return train(args)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # bad input, or a run that diverged: one line on stderr, exit status 1
        sys.exit(f"{Path(sys.argv[0]).name}: error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the last checkpoint.pt is intact; continue with --resume RUN")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
