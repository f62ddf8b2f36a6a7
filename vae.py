"""A convolutional variational autoencoder for CIFAR-10, scored in bits per dimension.

    python vae.py                                       # train with the defaults on CIFAR-10, one GPU
    python vae.py --epochs 200                          # the headline run
    torchrun --standalone --nproc_per_node=8 vae.py     # the same file on several GPUs
    python vae.py --eval runs/RUN                       # ELBO and IWAE bits/dim, then FID / IS / KID
    python vae.py --sample runs/RUN --n 64              # new images (--temperature 0.7 for smoother ones)
    python vae.py --interpolate runs/RUN                # walks in latent space between test images
    python vae.py --bench                               # throughput and memory of one training step
    python vae.py --data ../shared/data/cifar10-jpeg --width 16 --limit-train 4000   # a small CPU run
    python vae.py --preset aasae                        # AASAE: no KL, augmented encoder input (Eq. 6)
    python vae.py --probe runs/RUN                      # linear-probe accuracy of the posterior means

The model (Kingma & Welling 2014, https://arxiv.org/abs/1312.6114; Rezende et al. 2014,
https://arxiv.org/abs/1401.4082). A latent z ~ p(z) = N(0, I) is decoded into a distribution
p(x|z) over images. log p(x) = log integral p(x|z) p(z) dz has no closed form, so an encoder
q(z|x) = N(mu(x), diag sigma(x)^2) turns it into a lower bound (Jensen's inequality):

    log p(x) = log E_q[p(x|z) p(z) / q(z|x)]  >=  E_q[log p(x|z)] - KL(q(z|x) || p(z)) = ELBO(x)   (1)

The first term (minus the distortion) is estimated with one reparameterised sample
z = mu + sigma * eps, eps ~ N(0, I), so its gradient reaches the encoder; the second (the rate)
is exact for two Gaussians, per latent dimension:

    KL(N(mu, sigma^2) || N(0, 1)) = 1/2 (mu^2 + sigma^2 - 1 - log sigma^2)                        (2)

The likelihood (PixelCNN++, Salimans et al. 2017, https://arxiv.org/abs/1701.05517). A density on
continuous pixels is not a likelihood of 8-bit data. Scale x to [-1, 1], so the 256 values sit
2/255 apart, and give each subpixel the mass a mixture of logistics puts in its bin:

    P(x) = sum_k pi_k [ S((x + 1/255 - mu_k) / s_k) - S((x - 1/255 - mu_k) / s_k) ]                 (3)

with S the logistic CDF (the sigmoid). The bins of x = -1 and x = +1 are open to -inf and +inf,
so the 256 masses sum to exactly 1. The R, G, B subpixels of a pixel share the component k, and
the means of G and B move linearly with the values of R and G (PixelCNN++ Sec. 2.2):

    mu_G = mu_Gk + alpha_k R,    mu_B = mu_Bk + beta_k R + gamma_k G

Pixels are independent given z, so every correlation between pixels must travel through z.

Bits per dimension: -log2 P(x) / D = nll_nats / (D ln 2), D = 3 * 32 * 32 = 3072. A uniform
P over the 256 values gives exactly 8. -ELBO bounds the true value from above; we report it as
distortion (-E_q log p(x|z)) plus rate (KL), both in bits/dim.

A tighter bound (IWAE, Burda et al. 2016, https://arxiv.org/abs/1509.00519): with K samples z_k ~ q(z|x),

    log p(x) >= E[ log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x) ] = L_K,   ELBO = L_1 <= L_K <= L_{K+1}   (4)

and L_K -> log p(x) as K grows; `--eval` reports it with K = --iw-samples (100; papers use 1000+).

Posterior collapse. Early on, the KL term pulls q(z|x) onto the prior faster than the decoder
learns to use z, and collapsed units rarely come back. Two fixes, used only for training (every
reported number is the plain ELBO (1)): KL warm-up (Bowman et al. 2016,
https://arxiv.org/abs/1511.06349; Sonderby et al. 2016, https://arxiv.org/abs/1602.02282) scales
the KL by beta, rising linearly from 0 to 1 over --kl-warmup epochs; free bits (Kingma et al.
2016, the IAF paper, https://arxiv.org/abs/1606.04934, Eq. 15) stop penalising a group j of
latents (here: one channel map) while its batch-average KL is below lambda:

    L = E_q[log p(x|z)] - beta * sum_j max(lambda, E_batch KL_j)                                   (5)

Active units (Burda et al. 2016) count latent dimensions u with Cov_x(E_q[z_u]) > 0.01.

AASAE (Falcon et al. 2021, https://arxiv.org/abs/2107.12329): the same network as a representation
learner. Weight the KL by beta (--kl-weight; 1 is the VAE) and give the encoder a random view t(x)
(crop, flip, colour jitter, grayscale: SimCLR's, Chen et al. 2020) while the decoder scores the original:

    L_beta = E_t E_q(z|t(x)) [log p(x|z)] - beta KL(q(z|t(x)) || p(z))                            (6)

--preset aasae is beta = 0: nothing pulls q toward the prior, and to rebuild x from any view the code
must keep what survives a crop and a colour change, roughly what a class is. `--probe` measures it:
a linear classifier on the posterior means (labels are read for that command only; training never
sees them). Bits/dim and Eq. (6): Jensen's inequality (1) holds for every q, so q(z|t(x)) still gives
a (looser) bound on log p(x), and the test metrics evaluate q on the original image anyway. What
beta != 1 breaks is meaning, not validity: the run did not minimise the bound, and at beta = 0 the
rate is free to grow without limit, so -ELBO would measure the missing regulariser, not the model.
Such runs report distortion and rate, and say why there are no bits/dim.

Where the field went: hierarchies of latents, trained with the same bound: IAF-VAE 3.11, BIVA 3.08
(https://arxiv.org/abs/1902.02102), NVAE 2.91 (https://arxiv.org/abs/2007.03898), VDVAE 2.87
(https://arxiv.org/abs/2011.10650) bits/dim on CIFAR-10. From VDVAE we take its stabiliser:
skip any update whose gradient norm is not finite or far above normal.
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
from common import IMAGE_DIMS, UserError, bits_per_dim, non_negative_float, positive_float, positive_int

# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

PRESETS = {  # the objective each paper fixes; anything given on the command line wins
    "vae": dict(kl_weight=1.0, augment=False, kl_warmup=5.0, free_bits=0.05),
    "aasae": dict(kl_weight=0.0, augment=True, kl_warmup=0.0, free_bits=0.0),  # kl_coeff 0 (AASAE's README)
}
COMMANDS = ("resume", "sample", "eval", "interpolate", "probe", "bench")  # never read from a run's config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                usage=argparse.SUPPRESS)  # no usage block: a bad flag is one line, exit status 2
    # the flags every script shares
    p.add_argument("--epochs", type=positive_int, default=200, help="passes over the training set")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per step, all processes together")
    p.add_argument("--lr", type=positive_float, default=5e-4, help="AdamW learning rate after warm-up")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--device", choices=["auto", "cuda", "cpu", "mps"], default="auto", help="where to run")
    p.add_argument("--data", default="cifar10", help="'cifar10' or any folder of images")
    p.add_argument("--data-root", default="data", help="where CIFAR-10 and decoded-image caches live")
    p.add_argument("--run-dir", default="runs", help="parent folder of run folders")
    p.add_argument("--name", default="default", help="run name, part of the run folder's name")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision on CUDA: bf16 where native, else float16 with a gradient scaler")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--track", action="store_true", help="also log to Weights & Biases (needs wandb)")
    p.add_argument("--limit-train", type=positive_int, help="use only the first N training images")
    p.add_argument("--limit-test", type=positive_int, help="evaluate on the first N test images (default: all)")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between logged (host-synced) losses")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights (0: no EMA)")
    p.add_argument("--grad-clip", type=positive_float, default=20.0,
                   help="clip the gradient norm (typical norms: 1-3 at width 16, measured)")
    p.add_argument("--max-bad-steps", type=positive_int, default=100,
                   help="stop after this many skipped (non-finite or outlying) steps in a row")
    # what to do, if not training from scratch
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder (use --epochs to extend)")
    p.add_argument("--sample", metavar="RUN", help="write --n samples of this run")
    p.add_argument("--eval", metavar="RUN", help="ELBO and IWAE bits/dim, then FID / IS / KID of this run")
    p.add_argument("--interpolate", metavar="RUN", help="latent interpolations between test images of this run")
    p.add_argument("--probe", metavar="RUN", help="linear-probe top-1 of this run's encoder (and two baselines)")
    p.add_argument("--bench", action="store_true", help="measure training and sampling speed; write bench.json")
    p.add_argument("--n", type=positive_int, default=64, help="number of samples for --sample / --eval")
    p.add_argument("--fid-extractor", default="inception-v3-compat", help="torch-fidelity feature extractor")
    p.add_argument("--fid-weights", metavar="FILE", help="Inception weights file, for machines with no network")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="prior std for --sample / --eval")
    p.add_argument("--iw-samples", type=positive_int, default=100, help="K of the IWAE bound in --eval")
    # the network
    p.add_argument("--width", type=positive_int, default=128, help="channels at 32x32 (2x that below)")
    p.add_argument("--blocks", type=positive_int, default=3, help="residual blocks per resolution")
    p.add_argument("--latent-channels", type=positive_int, default=32, help="channels C of the latent map z")
    p.add_argument("--latent-size", type=int, choices=[4, 8, 16], default=8, help="z is C x size x size")
    p.add_argument("--mixtures", type=positive_int, default=10, help="logistic components per pixel")
    # the objective and its stabilisers (defaults of the first four come from --preset)
    p.add_argument("--preset", choices=PRESETS, default="vae", help="vae (default) or aasae (Eq. 6 with beta = 0)")
    p.add_argument("--kl-weight", type=non_negative_float, help="beta of Eq. (6): 1 is the VAE, 0 is AASAE")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="the encoder sees a random view (crop, flip, colour jitter, grayscale), the decoder the image")
    p.add_argument("--kl-warmup", type=non_negative_float, help="epochs for the KL weight 0 -> beta (vae: 5)")
    p.add_argument("--free-bits", type=non_negative_float,
                   help="lambda in nats per latent dimension, applied per channel map (vae: 0.05; 0: off)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.01, help="AdamW decoupled weight decay")
    p.add_argument("--warmup-steps", type=non_negative_float, default=200, help="linear learning-rate warm-up")
    p.add_argument("--skip-factor", type=positive_float, default=10.0,
                   help="skip an update whose gradient norm exceeds this times its running average")
    args = p.parse_args(argv)
    run = args.resume or args.sample or args.eval or args.interpolate or args.probe
    if run:  # the run's own settings become the defaults: `--resume RUN --epochs 300` keeps its width, data, ...
        p.set_defaults(**{k: v for k, v in read_config(run).items() if k not in COMMANDS})
        args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():  # the preset fills what is still unset
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 0 <= args.ema < 1:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
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
# The network: a residual encoder to a spatial latent, and a mirror-image decoder
# ----------------------------------------------------------------------------------------------

def group_norm(ch):
    # GroupNorm, not BatchNorm: a sample's output must not depend on the rest of its batch, which
    # matters when sampling (Wu & He 2018, https://arxiv.org/abs/1803.08494)
    return nn.GroupNorm(math.gcd(32, ch), ch)


class ResBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))): a pre-activation residual block."""

    def __init__(self, ch):
        super().__init__()
        self.block = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                   group_norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))
        nn.init.zeros_(self.block[-1].weight)  # every block starts as the identity: deep nets train from step 0
        nn.init.zeros_(self.block[-1].bias)

    def forward(self, x):
        return x + self.block(x)


class VAE(nn.Module):
    """q(z|x) and p(x|z). z is a C x 8 x 8 map (by default) rather than a vector.

    Why spatial: a vector must squeeze where-things-are through a dense layer; a map keeps the decoder
    convolutional and each latent local. Why 8x8, measured (width 16, C = 16, 3 epochs of 2000 JPEG
    images, 500 test images): 4x4 ended at 6.831 bits/dim, 8x8 at 6.794, 16x16 at 6.753. 16x16 was
    better, but with 4x the latent dimensions (and free-bits floor) and one stage less of decoder: at
    width 128 it has 9.8M parameters instead of 18.1M. Try --latent-size 16 with a wider net on a GPU.
    """

    def __init__(self, width=128, blocks=3, latent_channels=32, latent_size=8, mixtures=10):
        super().__init__()
        self.latent_channels, self.latent_size, self.mixtures = latent_channels, latent_size, mixtures
        n_down = int(math.log2(32 // latent_size))
        chs = [width] + [2 * width] * n_down  # channels at 32x32, 16x16, 8x8, ...

        enc = [nn.Conv2d(3, chs[0], 3, padding=1)]
        for i in range(n_down):
            enc += [ResBlock(chs[i]) for _ in range(blocks)] + [nn.Conv2d(chs[i], chs[i + 1], 3, stride=2, padding=1)]
        enc += [ResBlock(chs[-1]) for _ in range(blocks)]
        enc += [group_norm(chs[-1]), nn.SiLU(), nn.Conv2d(chs[-1], 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)  # (B, 3, 32, 32) -> (B, 2C, s, s): mu and log sigma^2

        dec = [nn.Conv2d(latent_channels, chs[-1], 3, padding=1)] + [ResBlock(chs[-1]) for _ in range(blocks)]
        for i in reversed(range(n_down)):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(chs[i + 1], chs[i], 3, padding=1)]
            dec += [ResBlock(chs[i]) for _ in range(blocks)]
        dec += [group_norm(chs[0]), nn.SiLU(), nn.Conv2d(chs[0], 10 * mixtures, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)  # (B, C, s, s) -> (B, 10M, 32, 32): mixture parameters

    def encode(self, x):
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)  # each (B, C, s, s)
        return mu, logvar

    def decode(self, z):
        # the likelihood is computed in float32 even under bf16 autocast. The last conv stays in bf16: measured on
        # the CPU demo (README, "Precision"), running it in float32 moved test bits/dim by 0.0002 of bf16's 0.001
        return self.decoder(z).float()

    def forward(self, x, view=None):
        """x in [-1, 1] -> (log p(x|z) per image (B,), KL per image and latent channel (B, C)). With a view
        t(x) (AASAE, Eq. 6) the encoder sees the view and the decoder still scores x."""
        mu, logvar = self.encode(x if view is None else view)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # the reparameterisation trick
        log_px_z = discretized_logistic_mixture_logp(x, self.decode(z), self.mixtures).sum((1, 2))
        return log_px_z, gaussian_kl(mu, logvar).sum((2, 3))


# ----------------------------------------------------------------------------------------------
# The likelihood, the KL and the bounds
# ----------------------------------------------------------------------------------------------

def split_mixture_params(params, mixtures):
    """(B, 10M, H, W) -> logits (B, M, H, W); means, log_scales, coeffs (B, 3, M, H, W) each."""
    b, _, h, w = params.shape
    logits = params[:, :mixtures]
    means, log_scales, coeffs = params[:, mixtures:].reshape(b, 3, 3, mixtures, h, w).unbind(1)
    # scales below e^-7 put all mass in one bin already; the floor keeps 1/s finite (PixelCNN++)
    return logits, means, log_scales.clamp(min=-7.0), torch.tanh(coeffs)


def discretized_logistic_mixture_logp(x, params, mixtures):
    """log P(x) of Eq. (3) per pixel (B, H, W) in nats; x (B, 3, H, W) on the grid -1 + 2k/255."""
    logits, means, log_scales, coeffs = split_mixture_params(params, mixtures)
    x = x.unsqueeze(2)  # (B, 3, 1, H, W): broadcast against the M components
    mean_r = means[:, 0]
    mean_g = means[:, 1] + coeffs[:, 0] * x[:, 0]  # G's mean moves with the true R (teacher forcing) ...
    mean_b = means[:, 2] + coeffs[:, 1] * x[:, 0] + coeffs[:, 2] * x[:, 1]  # ... and B's with R and G
    centred = x - torch.stack([mean_r, mean_g, mean_b], dim=1)  # (B, 3, M, H, W)
    inv_scale = torch.exp(-log_scales)
    upper, lower = inv_scale * (centred + 1 / 255), inv_scale * (centred - 1 / 255)
    # log(S(u) - S(l)) = log S(u) + log S(-l) + log(1 - e^(l - u)): exact, and stable in both tails
    log_bin = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(lower - upper))
    log_bin = torch.where(x < -0.999, F.logsigmoid(upper), log_bin)  # value 0: the bin (-inf, -1 + 1/255]
    log_bin = torch.where(x > 0.999, F.logsigmoid(-lower), log_bin)  # value 255: the bin [1 - 1/255, inf)
    # the three subpixels share the component, so their log-masses add before mixing
    return torch.logsumexp(log_bin.sum(1) + torch.log_softmax(logits, dim=1), dim=1)


def mixture_mean(params, mixtures):
    """E[x|z] (B, 3, H, W) in [-1, 1]: what the grids show (the decoder's samples add pixel noise)."""
    logits, means, _, coeffs = split_mixture_params(params, mixtures)
    r = means[:, 0]
    g = means[:, 1] + coeffs[:, 0] * r
    b = means[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g
    weights = torch.softmax(logits, dim=1)
    return torch.stack([(weights * c).sum(1) for c in (r, g, b)], dim=1).clamp(-1, 1)


def gaussian_kl(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) per dimension, Eq. (2)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


def log_normal(z, mu, logvar):
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp())


def training_loss(log_px_z, kl, beta, free_nats):
    """-L of Eq. (5) in nats per dimension; kl is (B, C), free_nats is lambda per channel map."""
    loss = -log_px_z.mean()
    if beta:  # beta = 0 (AASAE) drops the term: 0 * KL would be NaN, not 0, once an unpenalised KL overflows
        kl_per_channel = kl.mean(0)  # (C,) batch average: one free-bits group per channel map
        loss = loss + beta * kl_per_channel.clamp(min=free_nats).sum()  # clamp: no gradient while below lambda
    return loss / IMAGE_DIMS


def beta_at(step, steps_per_epoch, args):
    """beta at this step: --kl-weight, reached linearly over --kl-warmup epochs (so 0 stays 0)."""
    ramp = min(1.0, (step + 1) / (args.kl_warmup * steps_per_epoch)) if args.kl_warmup else 1.0
    return args.kl_weight * ramp


def reports_bits_per_dim(args):
    """-ELBO is reported as bits/dim only for runs that minimised it (beta = 1): see Eq. (6)."""
    return args.kl_weight == 1


def iwae_logp(net, x, k, generator, chunk=25):
    """L_K of Eq. (4) per image (B,): log mean_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x)."""
    mu, logvar = net.encode(x)
    log_w = []
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device)  # (n, B, C, s, s)
        z = mu + (0.5 * logvar).exp() * eps
        params = net.decode(z.flatten(0, 1))
        log_px_z = discretized_logistic_mixture_logp(x.repeat(n, 1, 1, 1), params, net.mixtures).sum((1, 2))
        log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum((2, 3, 4))  # (n, B)
        log_qz = log_normal(z, mu, logvar).sum((2, 3, 4))
        log_w.append(log_px_z.view(n, -1) + log_pz - log_qz)
    return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)  # logsumexp: the weights span 1000s of nats


# ----------------------------------------------------------------------------------------------
# The sampler: z ~ N(0, T^2 I), decoded
# ----------------------------------------------------------------------------------------------

def prior_noise(net, n, temperature, seed, device):
    g = torch.Generator().manual_seed(seed)  # a fixed generator: epochs and commands compare by eye
    s = net.latent_size
    return (temperature * torch.randn(n, net.latent_channels, s, s, generator=g)).to(device)


def sample_mixture(params, mixtures):
    """x ~ p(x|z) of Eq. (3), (B, 3, H, W) on the grid -1 + 2k/255: a component per pixel (shared by R, G and B),
    then R, G given R, B given R and G, each a logistic draw rounded to the bin it falls in (edge bins open)."""
    logits, means, log_scales, coeffs = split_mixture_params(params, mixtures)
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(min=1e-20)))
    k = (logits + gumbel).argmax(1)[:, None, None].expand(-1, 3, 1, -1, -1)  # Gumbel-max: k ~ softmax(logits)
    means, log_scales, coeffs = (t.gather(2, k).squeeze(2) for t in (means, log_scales, coeffs))  # (B, 3, H, W)
    u = torch.rand_like(means).clamp(1e-6, 1 - 1e-6)
    logistic = means + log_scales.exp() * (torch.log(u) - torch.log1p(-u))  # the logistic's inverse CDF
    to_bin = lambda v: (v.clamp(-1, 1) * 127.5 + 127.5).round() / 127.5 - 1  # noqa: E731
    r = to_bin(logistic[:, 0])
    g = to_bin(logistic[:, 1] + coeffs[:, 0] * r)  # the coupling of Eq. (3) uses the values drawn, as the
    b = to_bin(logistic[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g)  # likelihood uses the data's
    return torch.stack([r, g, b], dim=1)


@torch.inference_mode()
def decode_images(net, z, drawn=False):
    """Decode latents z (B, C, s, s) into images in [0, 1]: the mean E[x|z] of the pixel distribution (what the
    grids show), or with drawn=True a sample of p(x|z) (what FID / IS / KID score: the model's own samples)."""
    params = net.decode(z)
    return ((sample_mixture if drawn else mixture_mean)(params, net.mixtures) + 1) / 2


# ----------------------------------------------------------------------------------------------
# The encoder's view in AASAE: SimCLR's augmentations, on whole batches on the device
# ----------------------------------------------------------------------------------------------

# The AASAE code's CIFAR-10 setting (Lightning-Universe/paper-AAVAE, src/transforms/transforms.py, src/vae.py):
# RandomResizedCrop(32) with torchvision's default scale and ratio, flip p = 0.5, ColorJitter(0.4, 0.4, 0.4, 0.1)
# (jitter_strength 0.5) with p = 0.8, grayscale p = 0.2, no blur for CIFAR-10.
CROP_AREA, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
JITTER, P_JITTER, P_GRAY = (0.4, 0.4, 0.4, 0.1), 0.8, 0.2
LUMA = (0.2989, 0.587, 0.114)  # torchvision's grayscale weights


def grayscale(x):
    return sum(w * c for w, c in zip(LUMA, x.unbind(1))).unsqueeze(1)  # (B, 1, H, W)


def resized_crop(x, width, height, centre_x, centre_y, flip):
    """Crop each image to a box (sizes as fractions of the image, centre in [-1, 1]) and resize it back
    bilinearly, mirrored where flip is -1: one grid_sample whose grid maps output pixels into the box."""
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = width * flip, centre_x, height, centre_y
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def shift_hue(x, turns):
    """Rotate each image's hue by `turns` of the colour circle, as HSV does (torchvision's adjust_hue):
    max and min of R, G, B stay, the hue h (in sixths of the circle) moves, and the standard HSV -> RGB
    formula c_n = max - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6, n = 5, 3, 1 rebuilds it."""
    r, g, b = x.unbind(1)
    high, low = x.amax(1), x.amin(1)
    chroma = high - low
    c = chroma.clamp(min=1e-12)  # grey pixels (chroma 0) have no hue, and keep their value
    hue = torch.where(high == r, (g - b) / c, torch.where(high == g, (b - r) / c + 2, (r - g) / c + 4))
    hue = (hue + 6 * turns.view(-1, 1, 1)) % 6
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + hue.unsqueeze(1)) % 6
    return high.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def colour_jitter(x, brightness, contrast, saturation, hue):
    """torchvision's adjust_brightness, _contrast, _saturation and _hue with one factor per image (B,), in
    that fixed order (ColorJitter draws the order at random, once per image)."""
    factor = lambda f: f.view(-1, 1, 1, 1)  # noqa: E731
    x = (factor(brightness) * x).clamp(0, 1)
    mean = grayscale(x).mean((1, 2, 3), keepdim=True)
    x = (mean + factor(contrast) * (x - mean)).clamp(0, 1)
    gray = grayscale(x)
    x = (gray + factor(saturation) * (x - gray)).clamp(0, 1)
    return shift_hue(x, hue)


def augment(x):
    """A random SimCLR view of every image of x (B, 3, H, W) in [0, 1]: same shape, range and device. Draws
    come from the global generator, which each epoch reseeds: resume replays the same views."""
    u = lambda: torch.rand(len(x), device=x.device)  # noqa: E731  one U(0, 1) per image
    area = CROP_AREA[0] + (CROP_AREA[1] - CROP_AREA[0]) * u()
    ratio = torch.exp(math.log(CROP_RATIO[0]) + math.log(CROP_RATIO[1] / CROP_RATIO[0]) * u())  # log-uniform
    # a box larger than the image is shrunk to fit (torchvision draws again, up to 10 times, then centre-crops)
    width, height = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    x = resized_crop(x, width, height, (1 - width) * (2 * u() - 1), (1 - height) * (2 * u() - 1),
                     torch.where(u() < 0.5, -1.0, 1.0))
    jittered = colour_jitter(x, *(1 + s * (2 * u() - 1) for s in JITTER[:3]), JITTER[3] * (2 * u() - 1))
    x = torch.where(u().view(-1, 1, 1, 1) < P_JITTER, jittered, x)
    return torch.where(u().view(-1, 1, 1, 1) < P_GRAY, grayscale(x).expand_as(x), x)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def build(args, device):
    """The VAE (channels_last on a GPU: faster convolutions), its EMA copy, the optimiser and the gradient
    scaler (active only for float16)."""
    net = VAE(args.width, args.blocks, args.latent_channels, args.latent_size, args.mixtures)
    net = net.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    ema = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(args, device) == torch.float16)
    return net, ema, optimizer, scaler


@torch.no_grad()  # the average is not part of any graph (under autograd it would grow one per step)
def update_ema(ema, net, decay, step):
    """ema <- d ema + (1 - d) net, tensor by tensor, with d = min(decay, (1 + step) / (10 + step)): early
    on the average forgets its random start quickly; after ~9,000 steps d = decay."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - d)


def learning_rate(step, args):
    # linear warm-up, then constant (VDVAE): a pure function of the step, so resume needs no scheduler
    return args.lr * min(1.0, (step + 1) / max(1.0, args.warmup_steps))


def train_step(model, net, optimizer, scaler, x, beta, args, state, dtype):
    """One AdamW step on -L of Eq. (5) for a batch x (B, 3, 32, 32) in [0, 1]. Returns device tensors.

    The update is skipped when the gradient norm is not finite or far above its running average
    (VDVAE). The decision stays on the device, so the GPU never waits for the host: the fused AdamW
    kernel leaves weights, moments and step count alone where found_inf is 1.
    """
    view = augment(x) * 2 - 1 if args.augment else None  # AASAE: the encoder sees t(x), the decoder scores x
    with autocast(x.device, dtype):
        log_px_z, kl = model(x * 2 - 1, view)
    loss = training_loss(log_px_z, kl, beta, args.free_bits * args.latent_size**2)  # per dim -> per map
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # float16 only: the gradients back to their true size before clipping
    grad_norm = nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
    average = state.get("grad_norm_avg", torch.tensor(math.inf, device=grad_norm.device))  # inf: no step yet
    finite = torch.isfinite(grad_norm)
    bad = ~finite | (grad_norm > args.skip_factor * average)
    optimizer.found_inf = bad.float()
    optimizer.step()
    scaler.update()
    # the average of accepted norms; an outlier enters capped, so that a lasting change of scale is
    # accepted after a while instead of being skipped forever
    capped = torch.minimum(grad_norm, args.skip_factor * average)
    updated = torch.where(average.isinf(), grad_norm, 0.99 * average + 0.01 * capped)
    state["grad_norm_avg"] = torch.where(finite, updated, average)
    return loss.detach(), log_px_z.detach(), kl.detach(), grad_norm, bad


@torch.inference_mode()
def test_metrics(net, images, args, device, dtype, iw_samples=0):
    """Test-set bits/dim of -ELBO (and of -L_K), split into distortion and rate, and active units."""
    g = torch.Generator(device=device).manual_seed(0)  # the same eps every epoch; global RNG untouched
    totals = {"distortion": 0.0, "rate": 0.0, "iwae": 0.0}
    mu_sum, mu_sq = 0.0, 0.0
    batch = max(1, args.batch_size // 4) if iw_samples else args.batch_size  # IWAE decodes 25 z per image at once
    for start in range(0, len(images), batch):
        x = images[start:start + batch].to(device).float() / 127.5 - 1
        with autocast(device, dtype):
            mu, logvar = net.encode(x)
            z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=g, device=device)
            log_px = discretized_logistic_mixture_logp(x, net.decode(z), net.mixtures)
            log_px_z, kl = log_px.double().sum((1, 2)), gaussian_kl(mu, logvar).double()  # sums of 1000s
            if iw_samples:
                totals["iwae"] += -iwae_logp(net, x, iw_samples, g).sum().item()
        totals["distortion"] += -log_px_z.sum().item()
        totals["rate"] += kl.sum().item()
        mu_sum, mu_sq = mu_sum + mu.double().sum(0), mu_sq + mu.double().pow(2).sum(0)
    n = len(images)
    variance = mu_sq / n - (mu_sum / n) ** 2  # Cov_x(E_q[z_u]) per latent dimension u
    out = {k: bits_per_dim(v / n) for k, v in totals.items()}
    result = {"test_distortion_bpd": out["distortion"], "test_rate_bpd": out["rate"],
              "active_units": int((variance > 0.01).sum()), "latent_dims": variance.numel()}
    if reports_bits_per_dim(args):  # beta != 1: no total that looks like a likelihood (Eq. 6)
        result["test_bpd"] = out["distortion"] + out["rate"]
        if iw_samples:
            result.update(test_iwae_bpd=out["iwae"], iw_samples=iw_samples)
    return result


NO_BOUND = "no bits/dim: --kl-weight {:g} trains Eq. (6), not the ELBO (see vae.py's docstring)"


def describe_bound(result, args):
    """'6.2100 bits/dim (distortion 6.1 + rate 0.1)', or the two terms and why there is no total."""
    terms = f"distortion {result['test_distortion_bpd']:.4f} + rate {result['test_rate_bpd']:.4f}"
    if reports_bits_per_dim(args):
        return f"{result['test_bpd']:.4f} bits/dim ({terms})"
    return f"{terms} (each in bits/dim); {NO_BOUND.format(args.kl_weight)}"


def elbo_bits_per_dim(log_px_z, kl):
    """(-ELBO, distortion, rate) in bits/dim from log p(x|z) (B,) and KL (B, ...): batch means."""
    distortion = bits_per_dim(-log_px_z.double().mean().item())
    rate = bits_per_dim(kl.double().flatten(1).sum(1).mean().item())
    return distortion + rate, distortion, rate


def write_previews(net, run_dir, epoch, args, device, dtype, test_images):
    """samples/epoch_NNNN.png (T = 1), epoch_NNNN_t0.7.png, and reconstructions (originals above)."""
    with autocast(device, dtype):
        for t, suffix in ((1.0, ""), (0.7, "_t0.7")):
            images = decode_images(net, prior_noise(net, 64, t, args.seed, device))
            common.save_grid(images, run_dir / "samples" / f"epoch_{epoch:04d}{suffix}.png", nrow=8)
        originals = test_images[:10].to(device).float() / 255
        with torch.inference_mode():
            recon = decode_images(net, net.encode(originals * 2 - 1)[0])  # decode the posterior mean
    common.save_grid(torch.cat([originals, recon]), run_dir / "reconstructions" / f"epoch_{epoch:04d}.png", nrow=10)


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
    state = {"skipped_steps": torch.zeros((), device=device)}  # the skip rule's running statistics
    start_epoch, step = resume(args, net, ema, optimizer, scaler, state) if args.resume else (0, 0)
    # run folder and logging (rank 0)
    run_dir, log = open_run(args, step) if rank == 0 else (None, None)
    if rank == 0:
        print(f"run folder {run_dir}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_images)} training and {len(test_images)} test images, {len(loader)} steps per epoch on "
              f"{device} x {world}, precision {dtype or torch.float32}")
        if step == 0:  # the starting point of the curve: bits/dim at initialisation
            log(0, epoch=0, **test_metrics(ema, test_images, args, device, dtype))
    # the loop
    bad_streak = worst_streak = torch.zeros((), device=device)  # skipped steps in a row, counted on the device
    for epoch in range(start_epoch + 1, args.epochs + 1):
        torch.manual_seed(args.seed * 10**9 + rank * 10**6 + epoch)  # each rank's and epoch's own noise: exact resume
        tick = time.perf_counter()
        for i, x in enumerate(tqdm(loader.epoch(epoch), total=len(loader), desc=f"epoch {epoch}/{args.epochs}",
                                   disable=rank != 0, leave=False)):  # x: (B, 3, 32, 32) in [0, 1], flipped
            beta = beta_at(step, len(loader), args)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            loss, log_px_z, kl, grad_norm, bad = train_step(model, net, optimizer, scaler, x, beta, args, state, dtype)
            update_ema(ema, net, args.ema, step)
            step += 1
            bad_streak = (bad_streak + 1) * bad
            worst_streak = torch.maximum(worst_streak, bad_streak)
            state["skipped_steps"] = state["skipped_steps"] + bad
            if step % args.log_every == 0 or i == len(loader) - 1:  # the only host syncs
                if worst_streak.item() >= args.max_bad_steps:
                    raise UserError(f"training diverged: {args.max_bad_steps} updates in a row had non-finite or "
                                    f"exploding gradients by step {step}; the last good checkpoint is in "
                                    f"{args.resume or run_dir}: resume it with a lower --lr")
                if rank == 0:
                    bpd, distortion, rate = elbo_bits_per_dim(log_px_z, kl)
                    bound = {"train_bpd": bpd} if reports_bits_per_dim(args) else {}
                    log(step, epoch=epoch, loss=loss.item(), **bound, train_distortion_bpd=distortion,
                        train_rate_bpd=rate, beta=beta, lr=learning_rate(step, args), grad_norm=grad_norm.item(),
                        skipped_steps=state["skipped_steps"].item(),
                        img_per_s=(i + 1) * args.batch_size / (time.perf_counter() - tick))
        # end of epoch: evaluate, preview, checkpoint
        if rank == 0:
            seconds = time.perf_counter() - tick
            test = test_metrics(ema, test_images, args, device, dtype)
            write_previews(ema, run_dir, epoch, args, device, dtype, test_images)
            log(step, epoch=epoch, epoch_seconds=seconds, **test)
            save_checkpoint(run_dir, args=vars(args), net=net.state_dict(), ema=ema.state_dict(), epoch=epoch,
                            step=step, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), state=state)
            print(f"epoch {epoch}/{args.epochs}: test {describe_bound(test, args)}, active units "
                  f"{test['active_units']}/{test['latent_dims']}  ({seconds:.0f} s)")
        if world > 1:
            dist.barrier()
    if rank == 0:
        summary = {"epochs": args.epochs, "steps": step, "parameters": sum(p.numel() for p in net.parameters()),
                   **{f"final_{k}": v for k, v in test.items()}}
        if reports_bits_per_dim(args):  # what the EMA buys: the raw weights' bound
            summary["final_test_bpd_without_ema"] = test_metrics(net, test_images, args, device, dtype)["test_bpd"]
        else:
            summary["bits_per_dim"] = NO_BOUND.format(args.kl_weight)
        log.finish(summary)
    return run_dir


# ----------------------------------------------------------------------------------------------
# Sampling, evaluation, interpolation, the benchmark
# ----------------------------------------------------------------------------------------------

def load_trained(run, args, device):
    """The run's VAE with its EMA weights: every sample and evaluation uses them."""
    net, _, _, _ = build(args, device)
    load_weights(net, load_checkpoint(run)["ema"], run)
    return net.eval().requires_grad_(False)


def draw_samples(net, n, args, device, dtype, drawn=True):
    """n decoded prior draws at --temperature (float in [0, 1], on the CPU), in batches of --batch-size: samples
    of p(x|z), or with drawn=False the means E[x|z] (the same z)."""
    torch.manual_seed(args.seed)  # the pixel noise of p(x|z): the same samples every time
    out = []
    for start in range(0, n, args.batch_size):
        z = prior_noise(net, min(args.batch_size, n - start), args.temperature, args.seed + start, device)
        with autocast(device, dtype):
            out.append(decode_images(net, z, drawn).float().cpu())
    return torch.cat(out)


def sample(args):
    """RUN/samples_tT.png (means E[x|z] of the first 256) and samples_tT.npz (all --n, uint8, NHWC: 'samples' of
    p(x|z) and their 'means')."""
    device, _, _ = setup_device(args)
    dtype = amp_dtype(args, device)
    net = load_trained(args.sample, args, device)
    drawn, means = (draw_samples(net, args.n, args, device, dtype, d) for d in (True, False))
    stem = Path(args.sample) / f"samples_t{args.temperature:g}"
    common.save_grid(means[:256], f"{stem}.png")
    nhwc = lambda images: common.to_uint8(images).permute(0, 2, 3, 1).numpy()  # noqa: E731
    np.savez_compressed(f"{stem}.npz", samples=nhwc(drawn), means=nhwc(means))
    print(f"{args.n} samples at temperature {args.temperature:g}: {stem}.png (the first 256, as means E[x|z]), "
          f"{stem}.npz (samples of p(x|z), and means)")


def evaluate(args):
    """Test bits/dim (ELBO and IWAE), FID / IS / KID of --n samples of p(x|z) and, labelled means_*, of their
    means E[x|z], and the sampler's cost, into RUN/eval.json."""
    device, _, _ = setup_device(args)
    dtype = amp_dtype(args, device)
    net = load_trained(args.eval, args, device)
    test_images = common.load_images(args.data, args.data_root, "test")[:args.limit_test]
    iw_samples = args.iw_samples if reports_bits_per_dim(args) else 0
    print(f"IWAE bound with K = {iw_samples} on {len(test_images)} test images ..." if iw_samples else NO_BOUND.format(
        args.kl_weight))
    result = test_metrics(net, test_images, args, device, dtype, iw_samples=iw_samples)
    if not iw_samples:
        result["bits_per_dim"] = NO_BOUND.format(args.kl_weight)
    start = time.perf_counter()
    images = draw_samples(net, args.n, args, device, dtype)
    result.update(n_test=len(test_images), sampling_seconds_per_1000=1000 * (time.perf_counter() - start) / args.n,
                  nfe_per_sample=1, temperature=args.temperature)  # one decoder pass per sample
    metrics = lambda x: common.generative_metrics(x, args.data, args.data_root, args.fid_extractor,  # noqa: E731
                                                  args.fid_weights, device)
    result.update(metrics(images))  # the model's samples, as the other two models are scored
    means = metrics(draw_samples(net, args.n, args, device, dtype, drawn=False))  # smoother, and not samples
    result.update({f"means_{k}": means[k] for k in ("fid", "is_mean", "kid_mean")})
    (Path(args.eval) / "eval.json").write_text(json.dumps(result, indent=2))
    bound = f"test bits/dim {result['test_bpd']:.4f} (ELBO), {result['test_iwae_bpd']:.4f} (IWAE, K = " \
        f"{iw_samples})" if iw_samples else NO_BOUND.format(args.kl_weight)
    print(f"{bound}; samples of p(x|z): FID {result['fid']:.2f}, IS {result['is_mean']:.2f}, KID "
          f"{result['kid_mean']:.4f}; their means E[x|z]: FID {result['means_fid']:.2f}, IS "
          f"{result['means_is_mean']:.2f}, KID {result['means_kid_mean']:.4f}; {result['n_samples']} each "
          f"({args.fid_extractor}); written to {args.eval}/eval.json")


@torch.inference_mode()
def interpolate(args, pairs=6, steps=8):
    """RUN/interpolations.png: decoded straight lines between the posterior means of pairs of test images."""
    device, _, _ = setup_device(args)
    net = load_trained(args.interpolate, args, device)
    test_images = common.load_images(args.data, args.data_root, "test")
    if len(test_images) < 2:
        raise UserError("--interpolate needs at least 2 test images")
    pick = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for i in range(min(pairs, len(pick) // 2)):
        ends = test_images[pick[2 * i:2 * i + 2]].to(device).float() / 255  # (2, 3, 32, 32)
        with autocast(device, amp_dtype(args, device)):
            mu, _ = net.encode(ends * 2 - 1)
            t = torch.linspace(0, 1, steps, device=device).view(-1, 1, 1, 1)
            between = decode_images(net, (1 - t) * mu[0] + t * mu[1])
        rows.append((f"pair {i + 1}", torch.cat([ends[:1], between.float(), ends[1:]])))
    path = Path(args.interpolate) / "interpolations.png"
    common.save_rows(rows, path, title="test image, decoded walk between posterior means, test image")
    print(f"interpolations written to {path}")


@torch.no_grad()
def posterior_means(net, images, args, device, dtype):
    """E_q[z|x] of uint8 images (N, 3, 32, 32), flattened to (N, C s s) float32 on the device."""
    out = []
    for start in range(0, len(images), args.batch_size):
        x = images[start:start + args.batch_size].to(device).float() / 127.5 - 1
        with autocast(device, dtype):
            out.append(net.encode(x)[0].flatten(1).float())
    return torch.cat(out)


def probe(args):
    """RUN/probe.json: linear-probe top-1 on the test images with the run's posterior means as features, and
    the same protocol on two baselines: the same encoder at its random initialisation, and raw pixels. The
    only command that reads labels (from the class folders, or CIFAR-10's targets): training never does."""
    device, _, _ = setup_device(args)
    dtype = amp_dtype(args, device)
    start = time.perf_counter()
    splits = [common.load_split(args.data, args.data_root, split) for split in ("train", "test")]
    (train_x, train_y), (test_x, test_y) = ((d["images"][:limit], d["labels"][:limit].to(device))
                                            for d, limit in zip(splits, (args.limit_train, args.limit_test)))
    classes = splits[0]["classes"]
    if len(classes) < 2 or (train_y < 0).any() or (test_y < 0).any():
        raise UserError(f"--probe needs labels: --data {args.data} must hold train/<class>/ and test/<class>/ "
                        f"folders (at least two classes), not images without a class folder")
    trained = load_trained(args.probe, args, device)
    torch.manual_seed(args.seed)  # seeded as train() seeds it: the run's own initial weights
    untrained = build(args, device)[0].eval()
    encoders = {"trained_encoder": lambda images: posterior_means(trained, images, args, device, dtype),
                "random_encoder": lambda images: posterior_means(untrained, images, args, device, dtype),
                "raw_pixels": lambda images: images.flatten(1).to(device).float() / 127.5 - 1}
    result = {"n_train": len(train_x), "n_test": len(test_x), "classes": classes, "chance": 1 / len(classes)}
    print(f"linear probe: {len(classes)} classes, {len(train_x)} labelled training and {len(test_x)} test images")
    for name, features in encoders.items():
        train_features, test_features = features(train_x), features(test_x)
        top1, l2 = common.linear_probe(train_features, train_y, test_features, test_y, len(classes))
        result[name] = {"top1": top1, "l2": l2, "features": train_features.shape[1]}
        print(f"  {name:16} {train_features.shape[1]:5d} features: top-1 {100 * top1:.2f}% (l2 {l2:g})")
    result["seconds"] = time.perf_counter() - start
    (Path(args.probe) / "probe.json").write_text(json.dumps(result, indent=2))
    print(f"chance {100 / len(classes):.1f}%; written to {args.probe}/probe.json")
    return result


def bench(args, repeats=5):
    """Training steps (the real train_step: same optimiser, precision and compilation) and decoded samples
    per second, peak memory and projections; printed and written to runs/vae-bench__.../bench.json."""
    device, _, _ = setup_device(args)
    dtype = amp_dtype(args, device)
    torch.manual_seed(args.seed)
    net, _, optimizer, scaler = build(args, device)
    model = torch.compile(net) if args.compile else net
    x = torch.randint(0, 256, (args.batch_size, 3, 32, 32), device=device).float() / 255
    z = prior_noise(net, args.batch_size, 1.0, 0, device)

    def decode():
        with autocast(device, dtype):
            decode_images(net, z)

    state = {}
    train_s = seconds_per_call(lambda: train_step(model, net, optimizer, scaler, x, 1.0, args, state, dtype), repeats)
    sample_s = seconds_per_call(decode, repeats)
    result = {**machine(device), "parameters": sum(p.numel() for p in net.parameters()), "width": args.width,
              "precision": str(dtype or torch.float32).removeprefix("torch."), "compile": args.compile,
              "batch_size": args.batch_size, "train_images_per_s": args.batch_size / train_s,
              "sample_images_per_s": args.batch_size / sample_s, "nfe_per_sample": 1,
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
    """runs/vae__<name>__<seed>__<time>/ (vae-bench__... for the benchmark), made here."""
    model = f"vae-{kind}" if kind else "vae"
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
        torch.save({"model": "vae", **state}, f)
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
    if not isinstance(ckpt, dict) or ckpt.get("model") != "vae":
        raise UserError(f"{path} is not a checkpoint of vae.py")
    missing = {"args", "net", "ema", "optimizer", "scaler", "epoch", "step", "state"} - ckpt.keys()
    if missing:
        raise UserError(f"{path} is an incomplete checkpoint (it has no {', '.join(sorted(missing))})")
    return ckpt


def load_weights(module, state_dict, run):
    try:
        module.load_state_dict(state_dict)
    except RuntimeError:
        raise UserError(f"{run} holds a network of another width or architecture (see its config.json)") from None


def resume(args, net, ema, optimizer, scaler, state):
    """Load RUN/checkpoint.pt into the model; returns (epoch, step). No random state is needed: every epoch
    reseeds from (seed, rank, epoch), so resuming at an epoch boundary redraws exactly the same noise."""
    ckpt = load_checkpoint(args.resume)
    if ckpt["epoch"] >= args.epochs:
        raise UserError(f"{args.resume} already has {ckpt['epoch']} epochs: pass --epochs N with N > {ckpt['epoch']}")
    load_weights(net, ckpt["net"], args.resume)
    load_weights(ema, ckpt["ema"], args.resume)
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    state.update({key: value.to(state["skipped_steps"].device) for key, value in ckpt["state"].items()})
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
    if args.sample:
        return sample(args)
    if args.eval:
        return evaluate(args)
    if args.interpolate:
        return interpolate(args)
    if args.probe:
        return probe(args)
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
