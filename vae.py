"""A convolutional variational autoencoder for CIFAR-10, scored in bits per dimension.

    python vae.py                                       # train with the defaults on CIFAR-10, one GPU
    python vae.py --epochs 200                          # the headline run
    torchrun --standalone --nproc_per_node=8 vae.py     # the same file on several GPUs
    python vae.py --eval runs/RUN                       # ELBO and IWAE bits/dim, then FID / IS / KID
    python vae.py --sample runs/RUN --n 64              # new images (--temperature 0.7 for smoother ones)
    python vae.py --interpolate runs/RUN                # walks in latent space between test images
    python vae.py --bench                               # throughput and memory of one training step
    python vae.py --data ../shared/data/cifar10-jpeg --width 16 --limit-train 4000   # a small CPU run

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

Where the field went: hierarchies of latents, trained with the same bound: IAF-VAE 3.11, BIVA 3.08
(https://arxiv.org/abs/1902.02102), NVAE 2.91 (https://arxiv.org/abs/2007.03898), VDVAE 2.87
(https://arxiv.org/abs/2011.10650) bits/dim on CIFAR-10. From VDVAE we take its stabiliser:
skip any update whose gradient norm is not finite or far above normal.
"""

import argparse
import contextlib
import copy
import json
import math
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


def build_parser():
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=200, help="passes over the training set")
    p.add_argument("--batch-size", type=positive_int, default=128, help="global batch size (all ranks)")
    p.add_argument("--lr", type=positive_float, default=5e-4, help="AdamW learning rate after warm-up")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.01, help="AdamW decoupled weight decay")
    p.add_argument("--warmup-steps", type=non_negative_float, default=200, help="linear learning-rate warm-up")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--device", choices=["auto", "cuda", "cpu", "mps"], default="auto", help="where to run")
    p.add_argument("--data", default="cifar10", help="'cifar10' or a folder of images")
    p.add_argument("--data-root", default="data", help="where CIFAR-10 and decoded-image caches live")
    p.add_argument("--run-dir", default="runs", help="parent folder of run folders")
    p.add_argument("--name", default="default", help="experiment name in the run folder's name")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--track", action="store_true", help="also log to Weights & Biases")
    p.add_argument("--limit-train", type=positive_int, help="use only the first N training images")
    p.add_argument("--limit-test", type=positive_int, help="evaluate on the first N test images (default all)")
    p.add_argument("--log-every", type=positive_int, default=50, help="log training scalars every K steps")
    # the model
    p.add_argument("--width", type=positive_int, default=128, help="channels at 32x32 (2x that below)")
    p.add_argument("--blocks", type=positive_int, default=3, help="residual blocks per resolution")
    p.add_argument("--latent-channels", type=positive_int, default=32, help="channels C of the latent map z")
    p.add_argument("--latent-size", type=int, choices=[4, 8, 16], default=8, help="z is C x size x size")
    p.add_argument("--mixtures", type=positive_int, default=10, help="logistic components per pixel")
    # the objective and its stabilisers
    p.add_argument("--kl-warmup", type=non_negative_float, default=5.0, help="epochs for KL weight 0 -> 1")
    p.add_argument("--free-bits", type=non_negative_float, default=0.05,
                   help="lambda in nats per latent dimension, applied per channel map (0: off)")
    p.add_argument("--grad-clip", type=positive_float, default=20.0,
                   help="clip the gradient norm (typical norms: 1-3 at width 16, measured)")
    p.add_argument("--skip-factor", type=positive_float, default=10.0,
                   help="skip an update whose gradient norm exceeds this times its running average")
    p.add_argument("--ema-decay", type=non_negative_float, default=0.999, help="EMA of weights (0: off)")
    # commands on a finished run
    p.add_argument("--resume", help="continue the run in this folder")
    p.add_argument("--sample", help="write --n samples of this run")
    p.add_argument("--eval", help="ELBO, IWAE bits/dim and FID / IS / KID of this run")
    p.add_argument("--interpolate", help="latent interpolations between test images of this run")
    p.add_argument("--bench", action="store_true", help="time training steps and sampling; write bench.json")
    p.add_argument("--bench-steps", type=positive_int, default=20, help="timed steps for --bench")
    p.add_argument("--n", type=positive_int, default=64, help="number of samples for --sample / --eval")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="prior std for --sample / --eval")
    p.add_argument("--iw-samples", type=positive_int, default=100, help="K of the IWAE bound in --eval")
    p.add_argument("--fid-extractor", choices=["inception-v3-compat", "tiny-random"], default="inception-v3-compat",
                   help="feature network for FID / IS / KID ('tiny-random' is offline, for tests)")
    p.add_argument("--fid-weights", help="a downloaded Inception weights file")
    return p


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
        return self.decoder(z).float()  # the likelihood is computed in float32 even under bf16 autocast

    def forward(self, x):
        """x in [-1, 1] -> (log p(x|z) per image (B,), KL per image and latent channel (B, C))."""
        mu, logvar = self.encode(x)
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
    kl_per_channel = kl.mean(0)  # (C,) batch average: one free-bits group per channel map
    kl_term = kl_per_channel.clamp(min=free_nats).sum()  # clamp: no gradient while a group is below lambda
    return (-log_px_z.mean() + beta * kl_term) / IMAGE_DIMS


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
# Sampling and evaluation
# ----------------------------------------------------------------------------------------------

def autocast(device, amp):
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else contextlib.nullcontext()


@torch.inference_mode()
def sample(net, z):
    """Decode prior draws z (B, C, s, s) into images in [0, 1]. Temperature T: z ~ N(0, T^2 I)."""
    return (mixture_mean(net.decode(z), net.mixtures) + 1) / 2


def prior_noise(net, n, temperature, seed, device):
    g = torch.Generator().manual_seed(seed)  # a fixed generator: epochs and commands compare by eye
    s = net.latent_size
    return (temperature * torch.randn(n, net.latent_channels, s, s, generator=g)).to(device)


@torch.inference_mode()
def evaluate(net, images, batch_size, device, amp, iw_samples=0):
    """Test-set bits/dim of -ELBO (and of -L_K), split into distortion and rate, and active units."""
    g = torch.Generator(device=device).manual_seed(0)  # the same eps every epoch; global RNG untouched
    totals = {"distortion": 0.0, "rate": 0.0, "iwae": 0.0}
    mu_sum, mu_sq = 0.0, 0.0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device).float() / 127.5 - 1
        with autocast(device, amp):
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
    result = {"test_bpd": out["distortion"] + out["rate"], "test_distortion_bpd": out["distortion"],
              "test_rate_bpd": out["rate"], "active_units": int((variance > 0.01).sum()),
              "latent_dims": variance.numel()}
    if iw_samples:
        result.update(test_iwae_bpd=out["iwae"], iw_samples=iw_samples)
    return result


def elbo_bits_per_dim(log_px_z, kl):
    """(-ELBO, distortion, rate) in bits/dim from log p(x|z) (B,) and KL (B, ...): batch means."""
    distortion = bits_per_dim(-log_px_z.double().mean().item())
    rate = bits_per_dim(kl.double().flatten(1).sum(1).mean().item())
    return distortion + rate, distortion, rate


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def build_net(args):
    return VAE(args.width, args.blocks, args.latent_channels, args.latent_size, args.mixtures)


def train_step(model, optimizer, x01, beta, args, state, device):
    """One AdamW update, skipped when the gradient norm is non-finite or far above its average (VDVAE).

    The decision stays on the device, so the GPU never waits for the host: the fused AdamW kernel leaves
    weights, moments and step count alone where found_inf is 1 (the hook torch.amp.GradScaler uses).
    """
    with autocast(device, args.amp):
        log_px_z, kl = model(x01 * 2 - 1)
    loss = training_loss(log_px_z, kl, beta, args.free_bits * args.latent_size**2)  # per dim -> per map
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)  # (), on the device
    average = state.get("grad_norm_avg", torch.tensor(float("inf"), device=grad_norm.device))  # inf: no step yet
    finite = torch.isfinite(grad_norm)
    skip = ~finite | (grad_norm > args.skip_factor * average)
    optimizer.found_inf = skip.float()
    optimizer.step()
    # the average of accepted norms; an outlier enters capped, so that a lasting change of scale is
    # accepted after a while instead of being skipped forever
    capped = torch.minimum(grad_norm, args.skip_factor * average)
    updated = torch.where(average.isinf(), grad_norm, 0.99 * average + 0.01 * capped)
    state["grad_norm_avg"] = torch.where(finite, updated, average)
    return loss.detach(), log_px_z.detach(), kl.detach(), grad_norm.detach(), skip


def learning_rate(step, args):
    # linear warm-up, then constant (VDVAE): a pure function of the step, so resume needs no scheduler
    return args.lr * min(1.0, (step + 1) / max(1.0, args.warmup_steps))


def save_checkpoint(run_dir, net, ema_net, optimizer, epoch, step, state, args):
    common.atomic_save({"model": "vae", "args": vars(args), "net": net.state_dict(),
                        "ema": ema_net.state_dict() if ema_net is not None else None,
                        "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step, "state": state,
                        "rng": common.rng_state()},
                       Path(run_dir) / "checkpoint.pt")


def write_previews(run_dir, net, test_images, epoch, args, device):
    """samples/epoch_NNNN.png (T = 1), epoch_NNNN_t0.7.png, and reconstructions (originals above)."""
    with autocast(device, args.amp):
        for t, suffix in ((1.0, ""), (0.7, "_t0.7")):
            images = sample(net, prior_noise(net, 64, t, args.seed, device))
            common.save_grid(images, Path(run_dir) / "samples" / f"epoch_{epoch:04d}{suffix}.png", nrow=8)
        originals = test_images[:10].to(device).float() / 255
        with torch.inference_mode():
            recon = sample(net, net.encode(originals * 2 - 1)[0])  # decode the posterior mean
    common.save_grid(torch.cat([originals, recon]), Path(run_dir) / "reconstructions" / f"epoch_{epoch:04d}.png",
                     nrow=10)


def train(args):
    device, rank, world = common.setup_device(args.device)
    if args.batch_size < world:
        raise UserError(f"--batch-size {args.batch_size} is smaller than the {world} processes")
    # everything that can fail on user input happens before the run folder is created or touched.
    train_images = common.load_images(args.data, args.data_root, "train")[:args.limit_train]
    test_images = common.load_images(args.data, args.data_root, "test")[:args.limit_test]
    common.seed_everything(args.seed + rank)
    net = build_net(args).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    state, start_epoch, step, ckpt = {"skipped_steps": torch.zeros((), device=device)}, 0, 0, None
    if args.resume:
        ckpt = common.load_checkpoint(args.resume, "vae")
        common.load_weights(net, ckpt["net"], args.resume)
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        state = {k: torch.as_tensor(v).to(device) for k, v in ckpt["state"].items()}
        if args.epochs <= start_epoch:
            raise UserError(f"{args.resume} already has {start_epoch} epochs; pass --epochs > {start_epoch}")
    ema_net = copy.deepcopy(net).requires_grad_(False) if args.ema_decay > 0 else None
    if ema_net is not None and ckpt is not None and ckpt["ema"] is not None:
        common.load_weights(ema_net, ckpt["ema"], args.resume)
    model = torch.compile(net) if args.compile else net
    if world > 1:
        model = DistributedDataParallel(model)
    loader = common.DeviceLoader(train_images, args.batch_size // world, device, args.seed, rank, world)
    eval_net = ema_net if ema_net is not None else net
    n_params = sum(p.numel() for p in net.parameters())

    run_dir = log = None
    if rank == 0:
        run_dir = common.make_run_dir("vae", args)
        common.save_config(run_dir, args)
        log = common.RunLog(run_dir, args, args.track)
        print(f"vae: {n_params / 1e6:.2f}M parameters, {len(train_images)} train / {len(test_images)} test images, "
              f"{len(loader)} steps per epoch on {world} x {device.type}; run folder {run_dir}")
        if ckpt is None:  # the starting point of the curve: bits/dim at initialisation
            log.log(0, epoch=0, **evaluate(eval_net, test_images, args.batch_size, device, args.amp))
    if ckpt is not None and rank == 0:  # restored last, right before the loop: exact resume
        common.set_rng_state(ckpt["rng"])
    elif ckpt is not None:
        torch.manual_seed(args.seed + rank + 1000 * start_epoch)
    warmup_steps = args.kl_warmup * len(loader)
    skip_streak = worst_streak = torch.zeros((), device=device)  # consecutive skipped steps, on the device
    start_time = time.time()
    for epoch in range(start_epoch + 1, args.epochs + 1):
        bar = tqdm(loader.epoch(epoch), total=len(loader), desc=f"epoch {epoch}", disable=rank != 0, leave=False)
        tick, seen = time.time(), 0
        for x in bar:
            beta = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            loss, log_px_z, kl, grad_norm, skipped = train_step(model, optimizer, x, beta, args, state, device)
            skip_streak = (skip_streak + 1) * skipped
            worst_streak = torch.maximum(worst_streak, skip_streak)
            state["skipped_steps"] = state["skipped_steps"] + skipped
            if step % args.log_every == 0 and worst_streak.item() >= 100:  # host syncs only every K steps
                last = f"{run_dir or args.resume}/checkpoint.pt (epoch {epoch - 1})" if epoch > 1 else "none yet"
                raise UserError(f"training diverged: 100 updates in a row had non-finite or exploding gradients; "
                                f"the last good checkpoint is {last}: resume it with a lower --lr")
            if ema_net is not None:  # decay warms up so early epochs' EMA is not stale
                decay = min(args.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():  # the EMA is not part of any graph
                    torch._foreach_lerp_(list(ema_net.parameters()), list(net.parameters()), 1 - decay)
            step, seen = step + 1, seen + len(x) * world
            if step % args.log_every == 0 and rank == 0:
                bpd, distortion, rate = elbo_bits_per_dim(log_px_z, kl)
                images_per_s = seen / (time.time() - tick)
                bar.set_postfix(loss=f"{loss.item():.4f}", bpd=f"{bpd:.3f}", img_s=f"{images_per_s:.0f}")
                log.log(step, epoch=epoch, loss=loss, train_bpd=bpd, train_distortion_bpd=distortion,
                        train_rate_bpd=rate, beta=beta, lr=learning_rate(step, args), grad_norm=grad_norm,
                        skipped_steps=state["skipped_steps"], img_per_s=images_per_s)
        if rank == 0:
            metrics = evaluate(eval_net, test_images, args.batch_size, device, args.amp)
            log.log(step, epoch=epoch, epoch_seconds=time.time() - tick, **metrics)
            write_previews(run_dir, eval_net, test_images, epoch, args, device)
            save_checkpoint(run_dir, net, ema_net, optimizer, epoch, step, state, args)  # after all RNG use
            print(f"epoch {epoch}: test {metrics['test_bpd']:.4f} bits/dim (distortion "
                  f"{metrics['test_distortion_bpd']:.4f} + rate {metrics['test_rate_bpd']:.4f}), active units "
                  f"{metrics['active_units']}/{metrics['latent_dims']}, {time.time() - tick:.0f} s")
        if world > 1:
            dist.barrier()
    if rank == 0:
        summary = {"epochs": args.epochs, "steps": step, "parameters": n_params,
                   "wall_time_s": time.time() - start_time,
                   **{f"final_{k}": v for k, v in metrics.items()}}
        if ema_net is not None:  # what the EMA buys, measured: the same bound with the raw weights
            summary["final_test_bpd_without_ema"] = evaluate(net, test_images, args.batch_size, device,
                                                             args.amp)["test_bpd"]
        (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        common.plot_metrics(run_dir)
        log.close()


# ----------------------------------------------------------------------------------------------
# Commands on a trained run: --sample, --eval, --interpolate, --bench
# ----------------------------------------------------------------------------------------------

def load_trained(run, args, device):
    """The run's network with its EMA weights when it has them (that is what was evaluated)."""
    ckpt = common.load_checkpoint(run, "vae")
    net = build_net(args).to(device)
    common.load_weights(net, ckpt["ema"] if ckpt.get("ema") is not None else ckpt["net"], run)
    return net.eval()


def draw_samples(net, args, device):
    out = []
    for start in range(0, args.n, args.batch_size):
        z = prior_noise(net, min(args.batch_size, args.n - start), args.temperature, args.seed + start, device)
        with autocast(device, args.amp):
            out.append(sample(net, z).float().cpu())
    return torch.cat(out)


def sample_command(args):
    device, _, _ = common.setup_device(args.device)
    net = load_trained(args.sample, args, device)
    images = draw_samples(net, args, device)
    stem = Path(args.sample) / f"samples_t{args.temperature:g}"
    common.save_grid(images[:256], f"{stem}.png")
    np.savez_compressed(f"{stem}.npz", samples=common.to_uint8(images).permute(0, 2, 3, 1).numpy())  # NHWC
    print(f"{args.n} samples at temperature {args.temperature:g}: {stem}.png (first 256), {stem}.npz")


def eval_command(args):
    device, _, _ = common.setup_device(args.device)
    net = load_trained(args.eval, args, device)
    test_images = common.load_images(args.data, args.data_root, "test")[:args.limit_test]
    print(f"IWAE bound with K = {args.iw_samples} on {len(test_images)} test images ...")
    batch = max(1, args.batch_size // 4)  # each image is decoded in chunks of 25 latent samples
    result = evaluate(net, test_images, batch, device, args.amp, iw_samples=args.iw_samples)
    result["n_test"] = len(test_images)
    start = time.perf_counter()
    images = draw_samples(net, args, device)
    result["sampling_seconds_per_1000"] = 1000 * (time.perf_counter() - start) / args.n
    result["nfe_per_sample"] = 1  # one decoder pass per sample
    result.update(common.generative_metrics(images, args.data, args.data_root, args.fid_extractor,
                                            args.fid_weights, device), temperature=args.temperature)
    (Path(args.eval) / "eval.json").write_text(json.dumps(result, indent=2))
    print(f"test bits/dim: {result['test_bpd']:.4f} (ELBO), {result['test_iwae_bpd']:.4f} (IWAE, K = "
          f"{args.iw_samples}); FID {result['fid']:.2f}, IS {result['is_mean']:.2f}, KID {result['kid_mean']:.4f} "
          f"from {result['n_samples']} samples ({args.fid_extractor}); written to {args.eval}/eval.json")


@torch.inference_mode()
def interpolate_command(args, pairs=6, steps=8):
    device, _, _ = common.setup_device(args.device)
    net = load_trained(args.interpolate, args, device)
    test_images = common.load_images(args.data, args.data_root, "test")
    pick = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(args.seed))
    if len(pick) < 2:
        raise UserError("--interpolate needs at least 2 test images")
    rows = []
    for i in range(min(pairs, len(pick) // 2)):
        ends = test_images[pick[2 * i:2 * i + 2]].to(device).float() / 255  # (2, 3, 32, 32)
        with autocast(device, args.amp):
            mu, _ = net.encode(ends * 2 - 1)
            t = torch.linspace(0, 1, steps, device=device).view(-1, 1, 1, 1)
            between = sample(net, (1 - t) * mu[0] + t * mu[1])  # straight line between posterior means
        rows.append((f"pair {i + 1}", torch.cat([ends[:1], between.float(), ends[1:]])))
    path = Path(args.interpolate) / "interpolations.png"
    common.save_rows(rows, path, title="test image, decoded walk between posterior means, test image")
    print(f"interpolations written to {path}")


def bench_command(args):
    device, _, _ = common.setup_device(args.device)
    common.seed_everything(args.seed)
    net = build_net(args).to(device)
    model = torch.compile(net) if args.compile else net
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    x = torch.randint(0, 256, (args.batch_size, 3, 32, 32), device=device).float() / 255
    z = prior_noise(net, args.batch_size, 1.0, 0, device)

    def seconds_per_call(fn, repeats):  # after 3 warm-up calls (allocator, cuDNN autotuning, compilation)
        for _ in range(3):
            fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
        return (time.perf_counter() - start) / repeats

    state = {}
    step_s = seconds_per_call(lambda: train_step(model, optimizer, x, 1.0, args, state, device), args.bench_steps)
    with autocast(device, args.amp):
        sample_s = seconds_per_call(lambda: sample(net, z), 3)
    cuda = device.type == "cuda"
    import resource  # Unix only, hence here: peak resident memory when there is no GPU

    result = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "parameters": sum(p.numel() for p in
              net.parameters()), "width": args.width, "batch_size": args.batch_size, "amp": args.amp and cuda,
              "compile": args.compile, "train_images_per_s": args.batch_size / step_s,
              "sample_images_per_s": args.batch_size / sample_s,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else  # CPU: peak RSS in KiB
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "memory": "allocated" if cuda else "RSS",
              "projected_hours_200_epochs": 200 * 50_000 / (args.batch_size / step_s) / 3600}
    out_dir = Path(args.resume) if args.resume else Path(args.run_dir) / f"vae__bench__{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) + f"\nwritten to {out_dir}/bench.json")


def main(argv=None):
    args = common.parse_args(build_parser(), argv)
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.sample:
        sample_command(args)
    elif args.eval:
        eval_command(args)
    elif args.interpolate:
        interpolate_command(args)
    elif args.bench:
        bench_command(args)
    else:
        train(args)


if __name__ == "__main__":
    common.run_main(main)
