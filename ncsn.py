"""Noise Conditional Score Network (NCSN) with annealed Langevin dynamics, on CIFAR-10.

    python ncsn.py --epochs 200                        # NCSNv2's recipe on one GPU
    python ncsn.py --preset ncsn2019 --epochs 200      # the 2019 paper's setting, to compare
    python ncsn.py --toy                               # the paper's 2-D experiment, < 1 min on a CPU
    python ncsn.py --sample runs/RUN --n 64            # grid + .npz + trajectory figure
    python ncsn.py --sample runs/RUN --sampler ode --nfe 58   # another sampler, 58 network evaluations each
    torchrun --standalone --nproc_per_node=8 ncsn.py --epochs 200

The idea (Song & Ermon 2019, https://arxiv.org/abs/1907.05600). A generative model needs only the
*score* s(x) = grad_x log p(x): Langevin dynamics x <- x + alpha s(x) + sqrt(2 alpha) z samples p
given s. The score can be learned without knowing p by *denoising score matching* (Vincent 2011):
for x ~ data and x~ = x + sigma z, the minimiser of

    1/2 E || s(x~, sigma) - grad log N(x~; x, sigma^2 I) ||^2,   grad log N(x~; x, sigma^2 I) = -z / sigma,

is the score of the noised data p_sigma. Two problems remain: images lie near a low-dimensional
manifold where the data score is undefined, and Langevin chains cannot cross the low-density gaps
between modes, so they get mode weights wrong (see --toy). Both are solved by many noise levels
sigma_1 > ... > sigma_L: large sigma fills space and connects modes, small sigma is close to the data.
One network s(x, sigma) learns all levels with the loss weighted by lambda(sigma) = sigma^2, which
puts every level on the same scale (NCSN eq. 6):

    loss = 1/2 E_{sigma, x, z} || sigma s(x + sigma z, sigma) + z ||^2.

Annealed Langevin dynamics (NCSN Alg. 1) then samples: start from noise, run T Langevin steps at
each level with step alpha_i = eps sigma_i^2 / sigma_L^2, from the largest sigma down to the smallest.

NCSNv2 (Song & Ermon 2020, https://arxiv.org/abs/2006.09011) made this work at scale with five
techniques, all defaults here: (1) sigma_1 about the largest distance between training images (50
for CIFAR-10); (2) a geometric sequence with enough levels (L = 232); (3) s(x, sigma) = f(x) / sigma,
conditioning by division; (4) T and eps chosen so the chain equilibrates (T = 5, eps = 6.2e-6);
(5) an exponential moving average of the weights. A last denoising step x + sigma_L^2 s(x, sigma_L),
Tweedie's formula for E[x | x~], removes the remaining noise (Jolicoeur-Martineau et al. 2020).
Reported CIFAR-10 numbers (theirs): NCSN IS 8.87, FID 25.32; NCSNv2 FID 10.87, IS 8.40.

Other samplers use the same network (--sampler, with --nfe network evaluations per sample as the knob).
Blurring the data by a growing sigma is a stochastic differential equation, the variance-exploding SDE
dx = sqrt(d sigma^2 / dt) dw (Song et al. 2021, https://arxiv.org/abs/2011.13456). It can be run backwards
with the score: predictor-corrector (pc) takes one reverse-SDE step per level plus one Langevin step;
the probability-flow ODE dx/dsigma = -sigma s(x, sigma) (ode) has the same marginals p_sigma without any
noise, and Heun's method integrates it in far fewer steps (Karras et al. 2022, https://arxiv.org/abs/2206.00364).
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
from tqdm import tqdm

import common
from common import UserError, non_negative_float, positive_float, positive_int

# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

PRESETS = {  # the flags each paper fixes; anything given on the command line wins
    "ncsnv2": dict(sigma_max=50.0, sigma_min=0.01, num_scales=232, steps_per_level=5, step_eps=6.2e-6,
                   lr=1e-4, ema=0.999, denoise=True, score_param="divide"),
    "ncsn2019": dict(sigma_max=1.0, sigma_min=0.01, num_scales=10, steps_per_level=100, step_eps=2e-5,
                     lr=1e-3, ema=0.0, denoise=False, score_param="embed"),
}
COMMANDS = ("resume", "sample", "eval", "inpaint", "toy", "bench")  # what to do now: never read from a run's config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                usage=argparse.SUPPRESS)  # no usage block: a bad flag is one line, exit status 2
    # the flags every script shares
    p.add_argument("--epochs", type=positive_int, default=200, help="passes over the training set")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per step, all processes together")
    p.add_argument("--lr", type=positive_float, help="Adam learning rate (NCSNv2: 1e-4; 1e-3 blows up with f/sigma)")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--device", choices=["auto", "cuda", "cpu", "mps"], default="auto", help="where to run")
    p.add_argument("--data", default="cifar10", help="'cifar10' or any folder of images")
    p.add_argument("--data-root", default="data", help="where CIFAR-10 and decoded-image caches live")
    p.add_argument("--run-dir", default="runs", help="parent folder of run folders")
    p.add_argument("--name", default="default", help="run name, part of the run folder's name")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision on CUDA: bf16 where native, else float16 with a gradient scaler")
    p.add_argument("--compile", action="store_true", help="torch.compile the score network")
    p.add_argument("--track", action="store_true", help="also log to Weights & Biases (needs wandb)")
    p.add_argument("--limit-train", type=positive_int, help="use only the first N training images")
    p.add_argument("--limit-test", type=positive_int, default=1000, help="test images for the per-epoch DSM loss")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between logged (host-synced) losses")
    p.add_argument("--ema", type=float, help="EMA decay of the weights (0: no EMA)")
    p.add_argument("--grad-clip", type=non_negative_float, default=1.0, help="clip the gradient norm (0: off)")
    p.add_argument("--max-bad-steps", type=positive_int, default=100, help="stop after this many non-finite steps")
    # what to do, if not training from scratch
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder (use --epochs to extend)")
    p.add_argument("--sample", metavar="RUN", help="draw --n samples from this run's EMA model")
    p.add_argument("--eval", metavar="RUN", help="FID / IS / KID on --n samples, and the test DSM loss")
    p.add_argument("--inpaint", metavar="RUN", help="fill in occluded test images (right half, centre square)")
    p.add_argument("--toy", action="store_true", help="the NCSN paper's 2-D mixture experiment (CPU, < 1 min)")
    p.add_argument("--bench", action="store_true", help="measure training and sampling speed; write bench.json")
    p.add_argument("--n", type=positive_int, default=64, help="number of samples for --sample / --eval / --inpaint")
    p.add_argument("--fid-extractor", default="inception-v3-compat", help="torch-fidelity feature extractor")
    p.add_argument("--fid-weights", metavar="FILE", help="Inception weights file, for machines with no network")
    # the network
    p.add_argument("--preset", choices=PRESETS, default="ncsnv2", help="paper recipe: ncsnv2 (default) or ncsn2019")
    p.add_argument("--width", type=positive_int, default=112, help="channels at 32x32 (112: 26.2M parameters)")
    p.add_argument("--channel-mult", default="1,2,2,2", help="channel multiplier per resolution 32,16,8,4")
    p.add_argument("--num-res-blocks", type=positive_int, default=2, help="residual blocks per resolution")
    p.add_argument("--score-param", choices=["divide", "embed"], help="s = f(x, sigma) / sigma, or s = f(x, sigma)")
    # noise levels and the sampler (defaults come from --preset)
    p.add_argument("--sigma-max", type=positive_float, help="largest noise level sigma_1")
    p.add_argument("--sigma-min", type=positive_float, help="smallest noise level sigma_L")
    p.add_argument("--num-scales", type=positive_int, help="number of noise levels L")
    p.add_argument("--steps-per-level", type=positive_int, help="Langevin steps T at each level")
    p.add_argument("--step-eps", type=positive_float, help="eps in alpha_i = eps sigma_i^2 / sigma_L^2")
    p.add_argument("--denoise", action=argparse.BooleanOptionalAction, help="final Tweedie denoising step")
    p.add_argument("--sampler", choices=["ald", "pc", "ode"], default="ald",
                   help="ald: annealed Langevin (NCSN, the default); pc: predictor-corrector (Song et al. 2021);\n"
                        "ode: the probability-flow ODE with Heun steps (Karras et al. 2022)")
    p.add_argument("--nfe", type=positive_int,
                   help="network evaluations per sample, the sampler's cost (default: the run's L levels:\n"
                        "ald L x T + 1 = 1,161, pc 2L, ode 2L - 1)")
    p.add_argument("--snr", type=positive_float, default=0.16, help="pc: the corrector's signal-to-noise ratio")
    p.add_argument("--sample-batch", type=positive_int, default=1000, help="images per sampler batch")
    p.add_argument("--preview-levels", type=positive_int, default=100,
                   help="per-epoch preview grids use this many levels, one step each (cheaper than the sampler)")
    args = p.parse_args(argv)
    run = args.resume or args.sample or args.eval or args.inpaint
    if run:  # the run's own settings become the defaults: `--resume RUN --epochs 300` keeps its width, data, ...
        p.set_defaults(**{k: v for k, v in read_config(run).items() if k not in COMMANDS})
        args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():  # the preset fills what is still unset
        if getattr(args, key) is None:
            setattr(args, key, value)
    mult = str(args.channel_mult).split(",")
    if args.width % 2 or not all(m.isdigit() and int(m) > 0 for m in mult) or len(mult) > 5:
        p.error(f"--width must be even and --channel-mult 1 to 5 positive integers such as 1,2,2,2; got "
                f"--width {args.width} --channel-mult {args.channel_mult}")
    if not 0 <= args.ema < 1:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    if args.sigma_min >= args.sigma_max:
        p.error(f"--sigma-min {args.sigma_min:g} must be below --sigma-max {args.sigma_max:g}: the noise anneals down")
    levels = None if args.nfe is None else sampler_levels(args)[0]  # what --nfe pays for
    if levels is not None and levels < 2:
        least = {"ald": 2 * args.steps_per_level, "pc": 3, "ode": 2}[args.sampler] + int(args.denoise)
        p.error(f"--nfe {args.nfe} is too few for --sampler {args.sampler}: it needs two noise levels "
                f"(at least {least} evaluations)")
    if levels is not None and args.score_param == "embed" and levels > args.num_scales:
        p.error(f"--nfe {args.nfe} needs more noise levels than the {args.num_scales} this 'embed' network was "
                f"trained on, and it does not know the sigmas between them (README): use a smaller --nfe")
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
# Noise levels
# ----------------------------------------------------------------------------------------------

def geometric_sigmas(sigma_max, sigma_min, num_scales):
    """sigma_1 > ... > sigma_L with a constant ratio (NCSNv2 technique 2)."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_scales))


def noise_levels(args, levels=None):
    """The run's L sigmas, or `levels` of them for a cheaper sampler: rungs spread evenly along the ladder, since
    the network was trained at these sigmas only (an 'embed' network trained on 10 levels gives scores no better
    than zero between them: README). More levels than L: a finer geometric ladder between the same end points,
    which f / sigma networks handle and parse_args refuses for 'embed' ones."""
    ladder = geometric_sigmas(args.sigma_max, args.sigma_min, args.num_scales)
    if levels is None or levels == args.num_scales:
        return ladder
    if levels > args.num_scales:
        return geometric_sigmas(args.sigma_max, args.sigma_min, levels)
    return ladder[torch.linspace(0, args.num_scales - 1, levels).round().long()]


# ----------------------------------------------------------------------------------------------
# The score network: a compact U-Net conditioned on sigma
# ----------------------------------------------------------------------------------------------

def group_norm(channels):
    return nn.GroupNorm(math.gcd(32, channels), channels)  # GroupNorm, never BatchNorm: samples are not i.i.d.


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the noise embedding added in between (as in DDPM's U-Net)."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: deep nets train from step one
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class SigmaGroupNorm(nn.GroupNorm):
    """GroupNorm whose scale and shift are set by the noise level: h -> norm(h) exp(a(emb)) + b(emb).

    The network's last normalisation fixes the size of what the final conv sees, so with
    score_param='embed' it alone decides how large s(x, sigma) can be, and the true score grows as 1/sigma
    (5,000x from sigma = 50 to 0.01). NCSN 2019 conditions this norm on the level (CondInstanceNorm++);
    here scale and shift come from the sigma embedding (adaptive GroupNorm), the scale as exp(.) because
    it must span orders of magnitude (log 1/sigma is nearly linear in the embedding). Starts as GroupNorm.
    """

    def __init__(self, channels, emb_dim):
        super().__init__(math.gcd(32, channels), channels, affine=False)
        self.scale_shift = nn.Linear(emb_dim, 2 * channels)
        nn.init.zeros_(self.scale_shift.weight)
        nn.init.zeros_(self.scale_shift.bias)

    def forward(self, h, emb):
        with torch.autocast(h.device.type, enabled=False):  # exp of a float16 log-scale overflows past 11
            log_scale, shift = self.scale_shift(emb.float())[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1)
        return super().forward(h) * log_scale.exp() + shift


class ScoreNet(nn.Module):
    """s(x, sigma) for images x (B, 3, 32, 32) and noise levels sigma (B,).

    A U-Net, not the papers' RefineNet: it sees the whole image at 4x4 yet keeps 32x32 detail through
    skip connections, it is the architecture later score models settled on (DDPM, NCSN++), and it
    is faster per parameter. With score_param='divide' the output is f(x, sigma) / sigma (NCSNv2
    technique 3): the true score of p_sigma has size about 1/sigma, so f only has to produce unit-size
    outputs at every level. With 'embed' (NCSN 2019) s = f(x, sigma) must grow as 1/sigma by itself,
    which the sigma-conditioned last norm (SigmaGroupNorm) makes possible. A learned embedding of
    log sigma is added in every block in both modes.
    """

    def __init__(self, width=112, channel_mult=(1, 2, 2, 2), num_res_blocks=2, score_param="divide"):
        super().__init__()
        self.width, self.divide = width, score_param == "divide"
        emb_dim = 4 * width
        self.embed = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
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
            if level > 0:
                upsample = nn.Upsample(scale_factor=2, mode="nearest")
                self.up.append(nn.Sequential(upsample, nn.Conv2d(ch, ch, 3, padding=1)))
        # the last norm sets the output's size: fixed with 'divide' (f / sigma scales it), set by sigma with 'embed'
        norm = group_norm(ch) if self.divide else SigmaGroupNorm(ch, emb_dim)
        self.out = nn.Sequential(norm, nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)

    def sigma_embedding(self, sigma):
        """Sinusoidal features of log sigma (B,) -> (B, width), as transformers embed positions."""
        freqs = torch.logspace(-1, 2.5, self.width // 2, device=sigma.device)
        angles = sigma.log()[:, None] * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def forward(self, x, sigma):
        emb = self.embed(self.sigma_embedding(sigma))
        sigma = sigma[:, None, None, None]
        # Centre the input and divide by sqrt(sigma^2 + sigma_data^2) with sigma_data = 0.5 (the c_in
        # of Karras et al. 2022): the first layer sees values of order one at every noise level.
        # The head stays in float32 under --amp: rounded to bfloat16's 8-bit mantissa, a pixel near 1 moves
        # by up to 0.002 (half an 8-bit level), a fifth of sigma = 0.01. On a trained CPU demo model the score's
        # error at sigma = 0.01 falls from 4.1% to 1.2% (README, "Precision"), for 0.07% of the network's work.
        with torch.autocast(x.device.type, enabled=False):
            h = self.head((x.float() - 0.5) / (sigma.float()**2 + 0.25).sqrt())
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for block in self.middle:
            h = block(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        norm, act, conv = self.out
        f = conv(act(norm(h) if self.divide else norm(h, emb)))  # (B, 3, 32, 32)
        return f / sigma if self.divide else f


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------

def dsm_loss(score_net, x, sigmas, levels=None, noise=None):
    """Per-example denoising score matching loss 1/2 ||sigma s(x + sigma z, sigma) + z||^2 (NCSN eq. 6).

    lambda(sigma) = sigma^2 keeps every noise level's loss on the same scale: at the optimum it is
    about D/2 minus what the level lets the network predict. One level per example, drawn uniformly.
    """
    if levels is None:
        levels = torch.randint(len(sigmas), (len(x),), device=x.device)
    sigma = sigmas[levels].view(-1, *[1] * (x.dim() - 1))  # (B, 1, 1, 1) for images
    z = torch.randn_like(x) if noise is None else noise
    score = score_net(x + sigma * z, sigma.flatten()).float()
    return 0.5 * (sigma * score + z).pow(2).flatten(1).sum(1)


# ----------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------

def tweedie_denoise(score_net, x, sigma):
    """E[x_clean | x] = x + sigma^2 grad log p_sigma(x) (Tweedie's formula): the final denoising step."""
    return x + sigma**2 * score_net(x, sigma.expand(len(x))).float()


def observe(x, sigma, observed, mask, generator):
    """Inpainting (NCSN Alg. 2): the observed pixels (mask True) set to the observation noised afresh to the
    current level, so that the free pixels always see a sample of p_sigma consistent with it."""
    if mask is None:
        return x
    return torch.where(mask, observed + sigma * torch.randn(x.shape, generator=generator, device=x.device), x)


def annealed_langevin(score_net, x, sigmas, steps, eps, denoise=True, observed=None, mask=None, record=(),
                      generator=None):
    """Annealed Langevin dynamics (NCSN Alg. 1), and inpainting (Alg. 2) when observed/mask are given.

    The update x <- x + alpha s + sqrt(2 alpha) z follows the papers' code; Alg. 1 in the paper
    writes the same chain as x + alpha/2 s + sqrt(alpha) z, i.e. with a step twice as large.
    alpha_i = eps sigma_i^2 / sigma_L^2 scales the step with the level, so that the signal-to-noise
    ratio of each update is the same at every level. For inpainting the observed pixels are re-noised
    before every step (NCSNv2's code; the 2019 code re-noises once per level). Costs len(sigmas) x steps
    (+ 1 to denoise) network evaluations. Returns the samples and a snapshot after each level in `record`.
    """
    snapshots = []
    for i, sigma in enumerate(sigmas):
        alpha = eps * (sigma / sigmas[-1]) ** 2
        sigma_batch = sigma.expand(len(x))
        for _ in range(steps):
            x = observe(x, sigma, observed, mask, generator)
            z = torch.randn(x.shape, generator=generator, device=x.device)
            x = x + alpha * score_net(x, sigma_batch).float() + (2 * alpha).sqrt() * z
        if i in record:
            snapshots.append(x.clone())
    return finish(score_net, x, sigmas[-1], denoise, observed, mask, generator), snapshots


def finish(score_net, x, sigma_min, denoise, observed, mask, generator):
    """The optional denoising step, then the observation itself in the observed pixels."""
    if denoise:
        x = tweedie_denoise(score_net, observe(x, sigma_min, observed, mask, generator), sigma_min)
    return x if mask is None else torch.where(mask, observed, x)


def predictor_corrector(score_net, x, sigmas, snr=0.16, denoise=True, observed=None, mask=None, record=(),
                        generator=None):
    """Predictor-corrector sampling of the variance-exploding SDE (Song et al. 2021, Alg. 2 and 4).

    x must be a draw from about p_sigma_1. At each level: one Langevin *corrector* step whose size
    2 (snr |z| / |s|)^2 sets the ratio of noise to drift, with |z| and |s| averaged over the batch as in
    the official code (per sample, a chain that lands where s is about 0 takes a huge step: in 2-D that
    ruins the samples); then the *predictor*, one step of the reverse SDE from sigma_i to sigma_i+1:
    x + (sigma_i^2 - sigma_i+1^2) s + sqrt(sigma_i^2 - sigma_i+1^2) z.
    Costs 2 len(sigmas) - 1 (+ 1 to denoise) network evaluations.
    """
    snapshots = []
    for i, sigma in enumerate(sigmas):
        sigma_batch = sigma.expand(len(x))
        x = observe(x, sigma, observed, mask, generator)
        score = score_net(x, sigma_batch).float()
        z = torch.randn(x.shape, generator=generator, device=x.device)
        step = 2 * (snr * z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean()) ** 2
        x = x + step * score + (2 * step).sqrt() * z
        if i in record:
            snapshots.append(x.clone())
        if i + 1 < len(sigmas):
            x = observe(x, sigma, observed, mask, generator)
            variance = sigma**2 - sigmas[i + 1] ** 2  # the noise the reverse step removes
            z = torch.randn(x.shape, generator=generator, device=x.device)
            x = x + variance * score_net(x, sigma_batch).float() + variance.sqrt() * z
    return finish(score_net, x, sigmas[-1], denoise, observed, mask, generator), snapshots


def probability_flow_heun(score_net, x, sigmas, denoise=True, record=()):
    """The probability-flow ODE dx/dsigma = -sigma s(x, sigma) with Heun's method (Karras et al. 2022, Alg. 1).

    Deterministic: every point of p_sigma_1 is carried to a point of p_sigma_L, and the density follows
    p_sigma all the way. Heun = an Euler step, then the average of the slopes at both ends (second order).
    x must be a draw from about p_sigma_1. Costs 2 (len(sigmas) - 1) (+ 1 to denoise, which is the
    Euler step to sigma = 0) network evaluations.
    """
    snapshots = [x.clone()] if 0 in record else []

    def slope(x, sigma):
        return -sigma * score_net(x, sigma.expand(len(x))).float()

    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        d = slope(x, sigma)
        euler = x + (sigma_next - sigma) * d
        x = x + (sigma_next - sigma) * (d + slope(euler, sigma_next)) / 2
        if i + 1 in record:
            snapshots.append(x.clone())
    return finish(score_net, x, sigmas[-1], denoise, None, None, None), snapshots


def langevin_variance_ratio(eps, steps, gamma, sigma_min, carried_over=True):
    """Variance / sigma_i^2 of annealed Langevin's chains at the end of a level, for data at one point (the
    tight directions of images), where p_sigma = N(x*, sigma^2 I) and a step is x - x* <- a (x - x*) +
    sqrt(2 alpha) z with a = 1 - eps / sigma_L^2, whatever the level. Its equilibrium is c = 2 / (2 - eps /
    sigma_L^2) (above 1: the discretisation's bias). NCSNv2's technique 4 assumes that each level starts in
    equilibrium at the previous sigma, a ratio gamma^2 = (sigma_i-1 / sigma_i)^2, and gets a^2T (gamma^2 - c)
    + c. But the excess carries over from level to level, and over many levels the ratio settles where
    r = a^2T (gamma^2 r - c) + c, i.e. r = c (1 - a^2T) / (1 - gamma^2 a^2T): larger, and what the chains
    reach (tested on the exact score of a Gaussian).
    """
    b = eps / sigma_min**2
    c, decay = 2 / (2 - b), (1 - b) ** (2 * steps)
    return c * (1 - decay) / (1 - gamma**2 * decay) if carried_over else decay * (gamma**2 - c) + c


def technique4_eps(sigmas, steps, carried_over=True):
    """The step eps that brings the ratio above closest to 1 (it is always above 1). With NCSNv2's own
    formula (carried_over=False) it gives back NCSNv2's 6.2e-6 for 232 levels from 50 to 0.01 and T = 5."""
    gamma, sigma_min = (sigmas[0] / sigmas[1]).item(), sigmas[-1].item()
    b = torch.logspace(-4, 0, 4000, dtype=torch.float64)  # eps / sigma_L^2; the chain needs gamma^2 a^2T < 1
    ratio = langevin_variance_ratio(b * sigma_min**2, steps, gamma, sigma_min, carried_over)
    ratio[gamma**2 * (1 - b) ** (2 * steps) >= 1] = math.inf
    return (b[ratio.argmin()] * sigma_min**2).item()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def build(args, device):
    """The score network (channels_last on a GPU: faster convolutions), its EMA copy, the optimiser and the
    gradient scaler (active only for float16)."""
    mult = tuple(int(m) for m in str(args.channel_mult).split(","))
    net = ScoreNet(args.width, mult, args.num_res_blocks, args.score_param)
    net = net.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    ema = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, fused=True)  # fused: one kernel, and found_inf
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(args, device) == torch.float16)
    return net, ema, optimizer, scaler


@torch.no_grad()  # the average is not part of any graph (under autograd it would grow one per step)
def update_ema(ema, net, decay, step):
    """ema <- d ema + (1 - d) net, tensor by tensor (NCSNv2 technique 5), with d = min(decay, (1 + step) /
    (10 + step)): early on the average forgets its random start quickly; after ~9,000 steps d = decay."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - d)


def train_step(model, net, optimizer, scaler, x, sigmas, args, dtype):
    """One Adam step on the DSM loss of a batch x (B, 3, 32, 32) in [0, 1]. Returns device tensors.

    A step whose gradient is not finite is skipped without asking the host (which would stall the GPU):
    the fused Adam kernel leaves weights, moments and step count alone where found_inf is 1.
    """
    with autocast(x.device, dtype):
        loss = dsm_loss(model, x, sigmas).mean()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # float16 only: the gradients back to their true size before clipping
    grad_norm = nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip or math.inf)
    bad = ~torch.isfinite(grad_norm)
    optimizer.found_inf = bad.float()
    optimizer.step()
    scaler.update()
    return loss.detach(), grad_norm, bad


@torch.inference_mode()
def test_metrics(net, test_images, args, device, dtype, buckets=4):
    """DSM loss on test images with fixed noise, per quarter of the noise levels (largest sigmas first)."""
    g = torch.Generator(device=device).manual_seed(1234)
    sigmas = noise_levels(args).to(device)
    edges = torch.linspace(0, len(sigmas), buckets + 1).long().tolist()
    totals = torch.zeros(buckets, device=device)
    x = test_images.to(device).float() / 255
    for i in range(0, len(x), 500):
        batch = x[i:i + 500]
        for b in range(buckets):
            lo, hi = edges[b], max(edges[b + 1], edges[b] + 1)
            levels = torch.randint(lo, hi, (len(batch),), generator=g, device=device)
            noise = torch.randn(batch.shape, generator=g, device=device)
            with autocast(device, dtype):
                totals[b] += dsm_loss(net, batch, sigmas, levels, noise).sum()
    per_bucket = (totals / len(x)).tolist()
    return {"test_dsm": sum(per_bucket) / buckets, **{f"test_dsm_q{b + 1}": v for b, v in enumerate(per_bucket)}}


@torch.inference_mode()
def dsm_per_sigma(net, test_images, sigmas, device, dtype, seed=1234):
    """{sigma: DSM loss} on test images at each fixed sigma, the same noise for every sigma and every model, so
    that two runs compare level by level (D/2 = 1536 is the loss of a zero score)."""
    x = test_images.to(device).float() / 255
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    levels = torch.zeros(len(x), dtype=torch.long, device=device)  # one level: the sigma of the row
    out = {}
    for sigma in sigmas:
        sigma_t = torch.tensor([float(sigma)], device=device)
        with autocast(device, dtype):
            total = sum(dsm_loss(net, x[i:i + 500], sigma_t, levels[i:i + 500], z[i:i + 500]).sum().item()
                        for i in range(0, len(x), 500))
        out[float(sigma)] = total / len(x)
    return out


def write_previews(net, run_dir, epoch, args, device, dtype):
    """samples/epoch_NNNN.png from fixed noise, by a cheaper sampler: --preview-levels levels, one step each."""
    x, _ = draw_samples(net, 64, args, device, dtype, seed=0, preview=True)
    common.save_grid(x, run_dir / "samples" / f"epoch_{epoch:04d}.png", nrow=8)


def train(args):
    # device and DDP
    device, rank, world = setup_device(args)
    dtype = amp_dtype(args, device)
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    # seed: the same initial weights on every rank (DDP checks it); each epoch reseeds the noise below
    torch.manual_seed(args.seed)
    # data
    train_images = common.load_images(args.data, args.data_root, "train")[:args.limit_train]
    test_images = common.load_images(args.data, args.data_root, "test")[:args.limit_test]
    loader = common.DeviceLoader(train_images, args.batch_size // world, device, args.seed, rank, world)
    # model, EMA, optimiser
    net, ema, optimizer, scaler = build(args, device)
    model = torch.compile(net) if args.compile else net
    model = DistributedDataParallel(model) if world > 1 else model
    # resume
    start_epoch, step = resume(args, net, ema, optimizer, scaler) if args.resume else (0, 0)
    # run folder and logging (rank 0)
    run_dir, log = open_run(args, step) if rank == 0 else (None, None)
    if rank == 0:
        print(f"run folder {run_dir}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_images)} training images, {len(loader)} steps per epoch on {device} x {world}, "
              f"precision {dtype or torch.float32}")
        print(f"NCSNv2 technique 1: the largest distance between {min(2000, len(train_images))} training images "
              f"is {common.largest_distance(train_images, 2000):.1f}; sigma_1 = {args.sigma_max:g}")
        if step == 0:  # the baseline: a zero score (the initial network) gives D/2
            log(0, epoch=0, **test_metrics(ema, test_images, args, device, dtype))
    # the loop
    sigmas = noise_levels(args).to(device)
    bad_streak = worst_streak = torch.zeros((), device=device)  # non-finite steps in a row, counted on the device
    for epoch in range(start_epoch + 1, args.epochs + 1):
        torch.manual_seed(args.seed * 10**9 + rank * 10**6 + epoch)  # each rank's and epoch's own noise: exact resume
        tick = time.perf_counter()
        for i, x in enumerate(tqdm(loader.epoch(epoch), total=len(loader), desc=f"epoch {epoch}/{args.epochs}",
                                   disable=rank != 0, leave=False)):  # x: (B, 3, 32, 32) in [0, 1], flipped
            loss, grad_norm, bad = train_step(model, net, optimizer, scaler, x, sigmas, args, dtype)
            update_ema(ema, net, args.ema, step)
            step += 1
            bad_streak = (bad_streak + 1) * bad
            worst_streak = torch.maximum(worst_streak, bad_streak)
            if step % args.log_every == 0 or i == len(loader) - 1:  # the only host syncs
                if worst_streak.item() >= args.max_bad_steps:
                    raise UserError(f"training diverged: {args.max_bad_steps} non-finite steps in a row by step "
                                    f"{step}; the last good checkpoint is in {args.resume or run_dir}: resume it "
                                    "with a lower --lr")
                if rank == 0:
                    log(step, epoch=epoch, loss=loss.item(), grad_norm=grad_norm.item(), lr=args.lr,
                        img_per_s=(i + 1) * args.batch_size / (time.perf_counter() - tick))
        # end of epoch: evaluate, preview, checkpoint
        if rank == 0:
            seconds = time.perf_counter() - tick
            test = test_metrics(ema, test_images, args, device, dtype)
            write_previews(ema, run_dir, epoch, args, device, dtype)
            log(step, epoch=epoch, epoch_seconds=seconds, **test)
            save_checkpoint(run_dir, args=vars(args), net=net.state_dict(), ema=ema.state_dict(), epoch=epoch,
                            step=step, optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
            print(f"epoch {epoch}/{args.epochs}  step {step}  train loss {loss.item():.3f}  test DSM "
                  f"{test['test_dsm']:.3f}  ({seconds:.0f} s, {len(loader) * args.batch_size / seconds:.0f} img/s)")
        if world > 1:
            dist.barrier()
    if rank == 0:
        summary = {"epochs": args.epochs, "steps": step, **test, "parameters": sum(p.numel() for p in net.parameters())}
        log.finish(summary)
    return run_dir


# ----------------------------------------------------------------------------------------------
# Sampling, evaluation, inpainting, the benchmark
# ----------------------------------------------------------------------------------------------

def load_trained(run, args, device):
    """The run's score network with its EMA weights: every sample and evaluation uses them."""
    net, _, _, _ = build(args, device)
    load_weights(net, load_checkpoint(run)["ema"], run)
    return net.eval().requires_grad_(False)


def sampler_levels(args):
    """(levels, steps per level) the --sampler uses for a budget of --nfe network evaluations per sample.

    Without --nfe every sampler visits the run's L levels: ald with T steps each (L T + 1 = 1,161 for
    NCSNv2), pc with one corrector and one predictor step (2L), ode with one Heun step between
    neighbours (2L - 1). With --nfe every sampler takes as many levels as the budget pays for (noise_levels
    picks them, from sigma_1 to sigma_L): ald (nfe - 1) / T levels of T steps (and eps chosen for their spacing
    by technique4_eps). The final denoising step, when on, costs one evaluation in every sampler.
    """
    budget = None if args.nfe is None else args.nfe - int(args.denoise)
    if args.sampler == "ald":
        return (args.num_scales if budget is None else budget // args.steps_per_level), args.steps_per_level
    if budget is None:
        return args.num_scales, 1
    return ((budget + 1) // 2 if args.sampler == "pc" else budget // 2 + 1), 1


def sampler_settings(args, device, preview=False):
    """The --sampler's noise levels, steps and cost (nfe: network evaluations per sample), or for per-epoch
    previews a cheaper annealed Langevin: --preview-levels levels, one step each."""
    if preview:
        levels = min(args.preview_levels, args.num_scales)
        return dict(sampler="ald", sigmas=noise_levels(args, levels).to(device), steps=1, eps=args.step_eps,
                    snr=args.snr, denoise=args.denoise, nfe=levels + int(args.denoise))
    levels, steps = sampler_levels(args)
    sigmas = noise_levels(args, levels).to(device)
    eps = args.step_eps if args.nfe is None or args.sampler != "ald" else technique4_eps(sigmas.cpu(), steps)
    nfe = {"ald": levels * steps, "pc": 2 * levels - 1, "ode": 2 * (levels - 1)}[args.sampler] + int(args.denoise)
    return dict(sampler=args.sampler, sigmas=sigmas, steps=steps, eps=eps, snr=args.snr, denoise=args.denoise, nfe=nfe)


def run_sampler(net, x, settings, observed=None, mask=None, record=(), generator=None):
    """Turn the start x (uniform noise, the papers' choice) into samples with the chosen sampler. pc and ode
    integrate from p_sigma_1, so they start from x + sigma_1 z: uniform noise blurred at sigma_1."""
    name, sigmas = settings["sampler"], settings["sigmas"]
    if name == "ald":
        return annealed_langevin(net, x, sigmas, settings["steps"], settings["eps"], settings["denoise"], observed,
                                 mask, record, generator)
    x = x + sigmas[0] * torch.randn(x.shape, generator=generator, device=x.device)
    if name == "pc":
        return predictor_corrector(net, x, sigmas, settings["snr"], settings["denoise"], observed, mask, record,
                                   generator)
    if mask is not None:  # the ODE is deterministic: re-noising the observed pixels would break its flow
        raise UserError("--sampler ode cannot inpaint (it has no noise to condition with); use --sampler ald or pc")
    return probability_flow_heun(net, x, sigmas, settings["denoise"], record)


@torch.inference_mode()
def draw_samples(net, n, args, device, dtype, seed=0, trajectory=False, preview=False):
    """n samples (float, unclamped) from x_0 ~ U[0, 1]^D, in batches of --sample-batch; with trajectory=True
    also [(sigma, first batch's chains at that level)] at about eight levels, largest sigma first."""
    settings = sampler_settings(args, device, preview)
    levels = len(settings["sigmas"])
    record = sorted({round(i * (levels - 1) / 7) for i in range(8)}) if trajectory else ()
    g = torch.Generator(device=device).manual_seed(seed)
    out, snaps = [], []
    for i in range(0, n, args.sample_batch):
        x0 = torch.rand(min(args.sample_batch, n - i), 3, 32, 32, generator=g, device=device)
        with autocast(device, dtype):
            x, s = run_sampler(net, x0, settings, record=record, generator=g)
        out.append(x)
        snaps = snaps or [(settings["sigmas"][level].item(), snap) for level, snap in zip(record, s)]
    return torch.cat(out), snaps


SAMPLER_NAMES = {"ald": "annealed Langevin", "pc": "predictor-corrector", "ode": "probability-flow ODE (Heun)"}


def sample(args):
    """RUN/samples.png, samples.npz (uint8, NHWC) and trajectory.png (eight chains, largest noise first)."""
    device, _, _ = setup_device(args)
    net = load_trained(args.sample, args, device)
    x, snaps = draw_samples(net, args.n, args, device, amp_dtype(args, device), seed=args.seed, trajectory=True)
    out = Path(args.sample)
    common.save_grid(x, out / "samples.png")
    np.savez_compressed(out / "samples.npz", samples=common.to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())
    rows = [(f"sigma={sigma:.3g}", snap[:8]) for sigma, snap in snaps] + [("final", x[:8])]
    common.save_rows(rows, out / "trajectory.png",
                     title=f"{SAMPLER_NAMES[args.sampler]}: the same chains, largest noise first")
    print(f"wrote {args.n} samples to {out}/samples.png, samples.npz and trajectory.png "
          f"({sampler_settings(args, device)['nfe']} network evaluations each)")


EVAL_SIGMAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 50.0)  # the test DSM loss at each, in eval.json


def eval_sigmas(args):
    """{EVAL_SIGMAS inside the run's range: the run's level nearest to it}. The network is asked only about
    sigmas it was trained at (the 2019 setting's 10 levels: 0.03 -> 0.0278, 0.1 -> 0.129, ...)."""
    ladder = noise_levels(args)
    return {s: ladder[(ladder.log() - math.log(s)).abs().argmin()].item()
            for s in EVAL_SIGMAS if args.sigma_min <= s <= args.sigma_max}


def evaluate(args):
    """FID / IS / KID of --n samples, the test DSM loss (per bucket and at fixed sigmas), and the sampler's
    cost, into RUN/eval.json."""
    device, _, _ = setup_device(args)
    dtype = amp_dtype(args, device)
    net = load_trained(args.eval, args, device)
    start = time.perf_counter()
    x, _ = draw_samples(net, args.n, args, device, dtype, seed=args.seed)
    seconds = time.perf_counter() - start
    scores = common.generative_metrics(x, args.data, args.data_root, args.fid_extractor, args.fid_weights, device)
    test_images = common.load_images(args.data, args.data_root, "test")[:args.limit_test]
    test = test_metrics(net, test_images, args, device, dtype)
    used = eval_sigmas(args)
    per_sigma = dsm_per_sigma(net, test_images, list(used.values()), device, dtype)
    result = {**scores, **test, "test_dsm_at_sigma": {f"{k:g}": per_sigma[v] for k, v in used.items()},
              "test_dsm_sigma_used": {f"{k:g}": v for k, v in used.items()},
              "sampler": args.sampler, "nfe_per_sample": sampler_settings(args, device)["nfe"],
              "sampling_seconds_per_1000": 1000 * seconds / args.n}
    (Path(args.eval) / "eval.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def inpaint(args):
    """RUN/inpaint_right_half.png and inpaint_centre.png: masked test images, four completions, the originals."""
    device, _, _ = setup_device(args)
    net = load_trained(args.inpaint, args, device)
    settings = sampler_settings(args, device)
    y = (common.load_images(args.data, args.data_root, "test")[:8].float() / 255).to(device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    masks = {"right_half": torch.zeros(1, 1, 32, 32, dtype=torch.bool, device=device),
             "centre": torch.ones(1, 1, 32, 32, dtype=torch.bool, device=device)}
    masks["right_half"][..., :16] = True  # True = observed
    masks["centre"][..., 8:24, 8:24] = False
    for name, mask in masks.items():
        mask = mask.expand_as(y)
        rows = [("masked", torch.where(mask, y, 0.5))]
        for k in range(4):
            with torch.inference_mode(), autocast(device, amp_dtype(args, device)):
                x, _ = run_sampler(net, torch.rand(y.shape, generator=g, device=device), settings, y, mask,
                                   generator=g)
            rows.append((f"completion {k + 1}", x))
        rows.append(("original", y))
        common.save_rows(rows, Path(args.inpaint) / f"inpaint_{name}.png", title=f"inpainting: {name}")
    print(f"wrote {args.inpaint}/inpaint_right_half.png and inpaint_centre.png")


def bench(args, repeats=5):
    """Training steps (the real train_step: same optimiser, precision and compilation) and score evaluations
    per second, peak memory and projections; printed and written to runs/ncsn__bench__.../bench.json."""
    device, _, _ = setup_device(args)
    dtype = amp_dtype(args, device)
    torch.manual_seed(args.seed)
    net, _, optimizer, scaler = build(args, device)
    model = torch.compile(net) if args.compile else net
    sigmas = noise_levels(args).to(device)
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    xs = torch.rand(args.sample_batch, 3, 32, 32, device=device)

    def score_evals():
        with torch.inference_mode(), autocast(device, dtype):
            model(xs, sigmas[:1].expand(len(xs)))

    train_s = seconds_per_call(lambda: train_step(model, net, optimizer, scaler, x, sigmas, args, dtype), repeats)
    eval_s = seconds_per_call(score_evals, repeats)
    nfe = sampler_settings(args, device)["nfe"]
    result = {**machine(device), "parameters": sum(p.numel() for p in net.parameters()), "width": args.width,
              "precision": str(dtype or torch.float32).removeprefix("torch."), "compile": args.compile,
              "batch_size": args.batch_size, "train_images_per_s": args.batch_size / train_s,
              "sample_batch": args.sample_batch, "score_evals_per_s": args.sample_batch / eval_s,
              "nfe_per_sample": nfe,
              "projected_hours_200_epochs": 200 * 50_000 * train_s / args.batch_size / 3600,
              "projected_hours_50k_samples": 50_000 * nfe * eval_s / args.sample_batch / 3600}
    run_dir = new_run_dir(args, "bench")
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) + f"\nwrote {run_dir}/bench.json")
    return result


# ----------------------------------------------------------------------------------------------
# The toy experiment (NCSN paper, Fig. 3): why one noise level is not enough
# ----------------------------------------------------------------------------------------------

def exact_mixture_score(x, sigma):
    """grad_x log p_sigma(x) of the toy mixture (common.py), by autograd of its exact log density."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(common.mixture_log_prob(x, sigma).sum(), x)[0]


class ToyScore(nn.Module):
    """A small MLP score s(x, sigma) = f(x, log sigma) / sigma for 2-D points."""

    def __init__(self, hidden=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))

    def forward(self, x, sigma):
        return self.net(torch.cat([x, sigma.log()[:, None]], 1)) / sigma[:, None]


def share_in_first_mode(x):
    return (x.sum(1) > 0).float().mean().item()  # the (5, 5) side of the line x + y = 0


def toy(args, n=1280):
    """Plain vs annealed Langevin with the exact score, and annealed Langevin with a learned score."""
    run_dir = new_run_dir(args, "toy")
    g = torch.Generator().manual_seed(args.seed)
    data = common.toy_data("mixture", n, g)
    start = lambda: 16 * torch.rand(n, 2, generator=g) - 8  # uniform on [-8, 8]^2  # noqa: E731
    sigmas = geometric_sigmas(20.0, 1.0, 10)
    plain_steps = 1000
    with torch.no_grad():  # plain Langevin = a single level with the data's own score, step alpha = 0.1
        plain, _ = annealed_langevin(lambda x, s: exact_mixture_score(x, 0.0), start(), torch.ones(1), plain_steps,
                                     0.1, denoise=False, generator=g)
        annealed, _ = annealed_langevin(exact_mixture_score, start(), sigmas, 100, 0.1, denoise=False, generator=g)
    net = ToyScore()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(3000):
        loss = dsm_loss(net, common.toy_data("mixture", 256, g), sigmas).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        learned, _ = annealed_langevin(net, start(), sigmas, 100, 0.1, denoise=False, generator=g)
    panels = {"data": data, f"(a) Langevin, exact score, {plain_steps} steps": plain,
              "(b) annealed Langevin, exact score": annealed, "(c) annealed Langevin, learned score": learned}
    shares = {name: share_in_first_mode(x) for name, x in panels.items()}
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    for ax, (name, x) in zip(axes, panels.items()):
        ax.scatter(*x.T, s=2, alpha=0.5)
        ax.set(xlim=(-10, 10), ylim=(-10, 10), aspect="equal", title=f"{name}\nshare at (5,5): {shares[name]:.2f}")
    fig.suptitle("0.8 N((5,5), I) + 0.2 N((-5,-5), I): Langevin gets the weights wrong; annealing fixes it")
    fig.tight_layout()
    fig.savefig(Path(run_dir) / "toy.png", dpi=100)
    plt.close(fig)
    (Path(run_dir) / "toy.json").write_text(json.dumps(shares, indent=2))
    for name, share in shares.items():
        print(f"{share:.3f}  share of samples in the (5,5) mode: {name}")
    print(f"figure: {run_dir}/toy.png")
    return shares


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
    """runs/ncsn__<name>__<seed>__<time>/ (ncsn-bench__..., ncsn-toy__... for those commands), made here."""
    model = f"ncsn-{kind}" if kind else "ncsn"
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
        torch.save({"model": "ncsn", **state}, f)
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
    if not isinstance(ckpt, dict) or ckpt.get("model") != "ncsn":
        raise UserError(f"{path} is not a checkpoint of ncsn.py")
    missing = {"args", "net", "ema", "optimizer", "scaler", "epoch", "step"} - ckpt.keys()
    if missing:
        raise UserError(f"{path} is an incomplete checkpoint (it has no {', '.join(sorted(missing))})")
    return ckpt


def load_weights(module, state_dict, run):
    try:
        module.load_state_dict(state_dict)
    except RuntimeError:
        raise UserError(f"{run} holds a network of another width or architecture (see its config.json)") from None


def resume(args, net, ema, optimizer, scaler):
    """Load RUN/checkpoint.pt into the model; returns (epoch, step). No random state is needed: every epoch
    reseeds from (seed, rank, epoch), so resuming at an epoch boundary redraws exactly the same noise."""
    ckpt = load_checkpoint(args.resume)
    if ckpt["epoch"] >= args.epochs:
        raise UserError(f"{args.resume} already has {ckpt['epoch']} epochs: pass --epochs N with N > {ckpt['epoch']}")
    load_weights(net, ckpt["net"], args.resume)
    load_weights(ema, ckpt["ema"], args.resume)
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    for p in net.parameters():  # moments laid out like their weights: a channels_last (GPU) checkpoint goes
        for key, value in optimizer.state[p].items():  # to the CPU, whose fused Adam assumes equal layouts
            if value.shape == p.shape:
                optimizer.state[p][key] = torch.empty_like(p).copy_(value)
    if args.lr != ckpt["args"]["lr"]:  # --lr given on resume wins over the optimiser's saved one
        for group in optimizer.param_groups:
            group["lr"] = args.lr
    return ckpt["epoch"], ckpt["step"]


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
