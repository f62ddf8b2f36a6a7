"""A convolutional variational autoencoder (VAE) of CIFAR-10, scored in bits per dimension.

    python vae.py --epochs 200                      # the headline run, one GPU
    python vae.py --eval runs/RUN                   # ELBO and IWAE bits/dim, then FID / IS / KID
    python vae.py --sample runs/RUN --n 64          # new images (--temperature 0.7: smoother)
    python experiments/aasae.py --epochs 200        # AASAE: no KL, augmented encoder input (Eq. 6)
    python experiments/vae_interpolate.py runs/RUN  # walks in latent space between test images
    torchrun --standalone --nproc_per_node=8 vae.py --epochs 200

The model (Kingma & Welling 2014, https://arxiv.org/abs/1312.6114; Rezende et al. 2014). A latent z
~ p(z) = N(0, I) is decoded into a distribution p(x|z) over images. log p(x) = log integral p(x|z)
p(z) dz has no closed form; an encoder q(z|x) = N(mu(x), diag sigma(x)^2) turns it into a bound:

    log p(x) = log E_q[p(x|z) p(z) / q(z|x)] >= E_q[log p(x|z)] - KL(q(z|x) || p(z)) = ELBO(x)  (1)

The first term (minus the distortion) is estimated with one draw z = mu + sigma eps, eps ~ N(0, I),
so that its gradient reaches the encoder (the reparameterisation trick); the second (the rate) is
exact for two Gaussians: KL(N(mu, sigma^2) || N(0, 1)) = 1/2 (mu^2 + sigma^2 - 1 - log sigma^2) (2)

The likelihood (PixelCNN++, Salimans et al. 2017, https://arxiv.org/abs/1701.05517). A density on
continuous pixels is no likelihood of 8-bit data. With x scaled to [-1, 1] the 256 values sit 2/255
apart, and each subpixel gets the mass a mixture of logistics puts in its bin (S: the sigmoid):

    P(x) = sum_k pi_k [ S((x + 1/255 - mu_k) / s_k) - S((x - 1/255 - mu_k) / s_k) ]           (3)

The edge bins are open (to -inf below -1, to +inf above +1): the 256 masses sum to 1. R, G and B
share k, and the means of G and B move with the values of R and G: mu_G = mu_Gk + alpha_k R, mu_B =
mu_Bk + beta_k R + gamma_k G. Given z the pixels are independent: z carries all their correlation.
Bits/dim = -log2 P(x) / 3072 (uniform P: exactly 8), bounded from above by -ELBO (distortion plus
rate) and more tightly by IWAE (Burda et al. 2016, https://arxiv.org/abs/1509.00519), z_k ~ q(z|x):

    log p(x) >= E[ log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x) ] = L_K,  ELBO = L_1 <= L_K         (4)

L_K -> log p(x) as K grows (--eval: K = --iw-samples, 100; papers use 1000+). Posterior collapse:
early on the KL pulls q(z|x) onto the prior before the decoder uses z. Two fixes, in training only:
KL warm-up (Bowman et al. 2016) scales the KL by beta, from 0 to 1 over --kl-warmup epochs; free
bits (Kingma et al. 2016, IAF, Eq. 15) stop penalising a group j of latents (a channel map) while
its batch-average KL is below lambda:

    L = E_q[log p(x|z)] - beta * sum_j max(lambda, E_batch KL_j)                               (5)

AASAE (Falcon et al. 2021, https://arxiv.org/abs/2107.12329) makes the same network a
representation learner: weight the KL by beta (--kl-weight; 1 is the VAE) and give the encoder a
random view t(x) (crops, flips, colour changes: experiments/aasae.py) while the decoder scores x:

    L_beta = E_t E_q(z|t(x)) [log p(x|z)] - beta KL(q(z|t(x)) || p(z))                         (6)

At beta = 0 the code must keep what survives a crop and a colour change, roughly what a class is
(experiments/vae_probe.py measures it). Eq. (1) holds for every q, but a run with beta != 1 did not
minimise the bound (at beta = 0 the rate grows freely): it reports distortion and rate, not
bits/dim. Later VAEs stack latents (NVAE 2.91, VDVAE 2.87 bits/dim); from VDVAE we take its
stabiliser, bounding an update whose gradient norm is an outlier.
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

MODEL = "vae"


# ----------------------------------------------------------------------------------------------
# The network: a residual encoder to a spatial latent, and a mirror-image decoder
# ----------------------------------------------------------------------------------------------

def group_norm(channels):
    # GroupNorm, not BatchNorm: a sample's output must not depend on the rest of its batch
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))): a pre-activation residual block."""

    def __init__(self, ch):
        super().__init__()
        self.block = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                   group_norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))
        nn.init.zeros_(self.block[-1].weight)  # every block starts as the identity
        nn.init.zeros_(self.block[-1].bias)

    def forward(self, x):
        return x + self.block(x)


class VAE(nn.Module):
    """q(z|x) and p(x|z), z a C x 8 x 8 map (by default) rather than a vector: a map keeps the
    decoder convolutional and each latent local, where a vector must squeeze where-things-are
    through a dense layer (8x8 against 4x4 and 16x16: experiments/README.md)."""

    def __init__(self, width=128, blocks=3, latent_channels=32, latent_size=8, mixtures=10):
        super().__init__()
        self.latent_channels, self.latent_size = latent_channels, latent_size
        self.mixtures = mixtures
        n_down = int(math.log2(32 // latent_size))
        chs = [width] + [2 * width] * n_down  # channels at 32x32, 16x16, 8x8, ...
        enc = [nn.Conv2d(3, chs[0], 3, padding=1)]
        for i in range(n_down):
            enc += [ResBlock(chs[i]) for _ in range(blocks)]
            enc += [nn.Conv2d(chs[i], chs[i + 1], 3, stride=2, padding=1)]
        enc += [ResBlock(chs[-1]) for _ in range(blocks)]
        enc += [group_norm(chs[-1]), nn.SiLU(),
                nn.Conv2d(chs[-1], 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)  # (B, 3, 32, 32) -> (B, 2C, s, s): mu and log sigma^2
        dec = [nn.Conv2d(latent_channels, chs[-1], 3, padding=1)]
        dec += [ResBlock(chs[-1]) for _ in range(blocks)]
        for i in reversed(range(n_down)):
            dec += [nn.Upsample(scale_factor=2), nn.Conv2d(chs[i + 1], chs[i], 3, padding=1)]
            dec += [ResBlock(chs[i]) for _ in range(blocks)]
        dec += [group_norm(chs[0]), nn.SiLU(), nn.Conv2d(chs[0], 10 * mixtures, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)  # (B, C, s, s) -> (B, 10M, 32, 32): mixture parameters

    def encode(self, x):
        return self.encoder(x).float().chunk(2, dim=1)  # mu, log sigma^2: (B, C, s, s) each

    def decode(self, z):
        # the likelihood is computed in float32, whatever the network ran in (bf16 moves the test
        # bound by 0.001 bits/dim: experiments/README.md, "Precision")
        return self.decoder(z).float()

    def forward(self, x, view=None):
        """x in [-1, 1] -> (log p(x|z) per image (B,), KL per image and latent channel (B, C));
        given a view t(x) (AASAE, Eq. 6) the encoder sees the view and the decoder scores x."""
        mu, logvar = self.encode(x if view is None else view)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # the reparameterisation trick
        log_px_z = discretized_logistic_mixture_logp(x, self.decode(z), self.mixtures).sum((1, 2))
        return log_px_z, gaussian_kl(mu, logvar).sum((2, 3))


# ----------------------------------------------------------------------------------------------
# The loss: the likelihood, the KL and the bounds
# ----------------------------------------------------------------------------------------------

def split_mixture_params(params, mixtures):
    """(B, 10M, H, W) -> logits (B, M, H, W); means, log_scales, coeffs (B, 3, M, H, W) each."""
    b, _, h, w = params.shape
    logits = params[:, :mixtures]
    means, log_scales, coeffs = params[:, mixtures:].reshape(b, 3, 3, mixtures, h, w).unbind(1)
    # at s = e^-7 a bin holds 97% of a logistic centred on it; PixelCNN++'s floor keeps 1/s finite
    return logits, means, log_scales.clamp(min=-7.0), torch.tanh(coeffs)


def discretized_logistic_mixture_logp(x, params, mixtures):
    """log P(x) of Eq. (3) per pixel (B, H, W) in nats; x (B, 3, H, W) on the grid -1 + 2k/255."""
    logits, means, log_scales, coeffs = split_mixture_params(params, mixtures)
    x = x.unsqueeze(2)  # (B, 3, 1, H, W): broadcast against the M components
    mean_g = means[:, 1] + coeffs[:, 0] * x[:, 0]  # G's mean moves with the true R,
    mean_b = means[:, 2] + coeffs[:, 1] * x[:, 0] + coeffs[:, 2] * x[:, 1]  # B's with R and G
    centred = x - torch.stack([means[:, 0], mean_g, mean_b], dim=1)  # (B, 3, M, H, W)
    inv_scale = torch.exp(-log_scales)
    upper, lower = inv_scale * (centred + 1 / 255), inv_scale * (centred - 1 / 255)
    # log(S(u) - S(l)) = log S(u) + log S(-l) + log(1 - e^(l - u)): exact, and stable in both tails
    log_bin = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(lower - upper))
    log_bin = torch.where(x < -0.999, F.logsigmoid(upper), log_bin)  # 0: the bin (-inf, -1 + 1/255]
    log_bin = torch.where(x > 0.999, F.logsigmoid(-lower), log_bin)  # 255: the bin [1 - 1/255, inf)
    # the three subpixels share the component, so their log-masses add before mixing
    return torch.logsumexp(log_bin.sum(1) + torch.log_softmax(logits, dim=1), dim=1)


def gaussian_kl(mu, logvar):
    """KL(N(mu, sigma^2) || N(0, 1)) per dimension, Eq. (2)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


def log_normal(z, mu, logvar):
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) / logvar.exp())


def training_loss(log_px_z, kl, beta, free_nats):
    """-L of Eq. (5) in nats per dimension; kl is (B, C), free_nats is lambda per channel map."""
    loss = -log_px_z.mean()
    if beta:  # beta = 0 (AASAE) drops the term: 0 * KL is NaN, not 0, once a free KL overflows
        loss = loss + beta * kl.mean(0).clamp(min=free_nats).sum()  # no gradient below lambda
    return loss / common.IMAGE_DIMS


def iwae_logp(net, x, k, chunk=25):
    """L_K of Eq. (4) per image (B,): log mean_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x)."""
    mu, logvar = net.encode(x)
    log_w = []
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        z = mu + (0.5 * logvar).exp() * torch.randn(n, *mu.shape, device=mu.device)  # (n, B, ...)
        params = net.decode(z.flatten(0, 1))
        log_px_z = discretized_logistic_mixture_logp(x.repeat(n, 1, 1, 1), params, net.mixtures)
        log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)).sum((2, 3, 4))  # (n, B)
        log_qz = log_normal(z, mu, logvar).sum((2, 3, 4))
        log_w.append(log_px_z.sum((1, 2)).view(n, -1) + log_pz - log_qz)
    return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)  # the weights span 1000s of nats


# ----------------------------------------------------------------------------------------------
# The sampler: z ~ N(0, T^2 I), decoded
# ----------------------------------------------------------------------------------------------

def sample_mixture(params, mixtures):
    """x ~ p(x|z) of Eq. (3), (B, 3, H, W) on the grid -1 + 2k/255: a component per pixel (shared by
    R, G, B), then R, G given R, B given R and G, each a logistic draw rounded to its bin."""
    logits, means, log_scales, coeffs = split_mixture_params(params, mixtures)
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(min=1e-20)))
    k = (logits + gumbel).argmax(1)[:, None, None].expand(-1, 3, 1, -1, -1)  # k ~ softmax(logits)
    means, log_scales, coeffs = (t.gather(2, k).squeeze(2) for t in (means, log_scales, coeffs))
    u = torch.rand_like(means).clamp(1e-6, 1 - 1e-6)
    logistic = means + log_scales.exp() * (torch.log(u) - torch.log1p(-u))  # inverse CDF
    to_bin = lambda v: (v.clamp(-1, 1) * 127.5 + 127.5).round() / 127.5 - 1  # noqa: E731
    r = to_bin(logistic[:, 0])
    g = to_bin(logistic[:, 1] + coeffs[:, 0] * r)  # the coupling of Eq. (3) uses the values drawn,
    b = to_bin(logistic[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g)  # as the likelihood the data's
    return torch.stack([r, g, b], dim=1)


def mixture_mean(params, mixtures):
    """E[x|z] (B, 3, H, W) in [-1, 1]: a smooth picture of what z encodes (no pixel noise)."""
    logits, means, _, coeffs = split_mixture_params(params, mixtures)
    r, weights = means[:, 0], torch.softmax(logits, dim=1)
    g = means[:, 1] + coeffs[:, 0] * r
    b = means[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g
    return torch.stack([(weights * c).sum(1) for c in (r, g, b)], dim=1).clamp(-1, 1)


@torch.inference_mode()
def decode_images(net, z, drawn=True):
    """Images in [0, 1] for latents z (B, C, s, s): samples of p(x|z), or with drawn=False the means
    E[x|z] (what the reconstructions show)."""
    return ((sample_mixture if drawn else mixture_mean)(net.decode(z), net.mixtures) + 1) / 2


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def build(args, device):
    """The VAE (channels_last on a GPU: faster convolutions), its EMA copy, AdamW and the scaler."""
    net = VAE(args.width, args.blocks, args.latent_channels, args.latent_size, args.mixtures)
    net = net.to(device, memory_format=torch.channels_last if device.type == "cuda" else None)
    ema = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), args.lr, weight_decay=args.weight_decay,
                                  fused=True)
    return net, ema, optimizer, grad_scaler(device, amp_dtype(args, device))


@torch.no_grad()  # the average is not part of any graph (under autograd it would grow every step)
def update_ema(ema, net, decay, step):
    """ema <- d ema + (1 - d) net, d = min(decay, (1 + step) / (10 + step)): the average forgets its
    random start quickly."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p, 1 - d)


def schedule(step, steps_per_epoch, args):
    """(learning rate, beta) at a step: the lr rises linearly over --warmup-steps, then stays
    (VDVAE); beta rises linearly to --kl-weight over --kl-warmup epochs (KL warm-up). Functions of
    the step: a resumed run needs no scheduler state."""
    lr = args.lr * min(1.0, (step + 1) / max(1.0, args.warmup_steps))
    warm = min(1.0, (step + 1) / (args.kl_warmup * steps_per_epoch)) if args.kl_warmup else 1.0
    return lr, args.kl_weight * warm


def train_step(model, net, optimizer, scaler, x, beta, args, state, dtype, view=None):
    """One AdamW step on -L of Eq. (5) for a batch x (B, 3, 32, 32) in [0, 1]; given a function
    `view`, the encoder sees view(x) (Eq. 6). Returns ({name: device tensor} to log, a device bool:
    the loss is not finite, the sign of a divergence)."""
    with autocast(x.device, dtype):
        log_px_z, kl = model(x * 2 - 1, None if view is None else view(x) * 2 - 1)
    loss = training_loss(log_px_z, kl, beta, args.free_bits * args.latent_size**2)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # the gradients' true size (under float16) before clipping
    # VDVAE skips an update whose gradient norm passes a fixed threshold (400 on CIFAR-10); here it
    # is clipped to --skip-factor x the norms' running average (float16's loss scale stays as is)
    average = state["grad_norm_avg"]
    bound = args.skip_factor * average  # a norm beyond it is an outlier
    max_norm = bound.clamp(max=args.grad_clip or math.inf)  # (--grad-clip: a fixed cap as well)
    grad_norm = nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None])
    # the norm in units of max_norm, clipped to 1: clip_grad_norm_ would read max_norm, a device
    # tensor, on the host (a GPU sync every step)
    nn.utils.clip_grads_with_norm_(net.parameters(), 1.0, grad_norm / max_norm)
    scaler.step(optimizer)  # skipped if a gradient is not finite
    scaler.update()
    # the running average enters an outlier capped, so that a lasting change of scale is accepted
    capped = 0.99 * average + 0.01 * grad_norm.clamp(max=bound)
    updated = torch.where(average.isinf(), grad_norm, capped)
    state["grad_norm_avg"] = torch.where(grad_norm.isfinite(), updated, average)
    state["clipped_outliers"] += grad_norm > bound
    distortion, rate = -log_px_z.detach().double().mean(), kl.detach().double().sum(1).mean()
    return {"loss": loss.detach(), "distortion_bpd": common.bits_per_dim(distortion),
            "rate_bpd": common.bits_per_dim(rate), "grad_norm": grad_norm}, ~torch.isfinite(loss)


@torch.inference_mode()
def test_metrics(net, images, args, device, dtype, iw_samples=0):
    """Test-set bits/dim of -ELBO, as distortion and rate (and of -L_K with iw_samples), and the
    active units (Burda et al. 2016: latent dimensions u with Cov_x(E_q[z_u]) > 0.01)."""
    torch.manual_seed(0)  # the same eps every time (train() reseeds before the next epoch)
    totals, mu_sum, mu_sq = torch.zeros(3, dtype=torch.float64, device=device), 0.0, 0.0
    batch = max(1, args.batch_size // 4) if iw_samples else args.batch_size  # IWAE: 25 z at once
    for start in range(0, len(images), batch):
        x = images[start:start + batch].to(device).float() / 127.5 - 1
        with autocast(device, dtype):
            mu, logvar = net.encode(x)
            z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
            log_px = discretized_logistic_mixture_logp(x, net.decode(z), net.mixtures)
            iwae = -iwae_logp(net, x, iw_samples).double().sum() if iw_samples else 0.0
        kl = gaussian_kl(mu, logvar).double().sum()
        totals += torch.stack([-log_px.double().sum(), kl, torch.as_tensor(iwae, device=device)])
        mu_sum, mu_sq = mu_sum + mu.double().sum(0), mu_sq + mu.double().pow(2).sum(0)
    distortion, rate, iwae = (common.bits_per_dim(v / len(images)) for v in totals.tolist())
    variance = mu_sq / len(images) - (mu_sum / len(images)) ** 2  # Cov_x(E_q[z_u]) per dimension u
    result = {"test_distortion_bpd": distortion, "test_rate_bpd": rate,
              "active_units": int((variance > 0.01).sum()), "latent_dims": variance.numel()}
    if args.kl_weight == 1:  # beta != 1: no total that looks like a likelihood (Eq. 6)
        result["test_bpd"] = distortion + rate
        if iw_samples:
            result.update(test_iwae_bpd=iwae, iw_samples=iw_samples)
    return result


def write_previews(net, run_dir, epoch, args, device, dtype, test_images):
    """samples/epoch_NNNN.png, from the same z every epoch: samples of p(x|z), their means, means at
    temperature 0.7, and test images with their reconstructions (the means of p(x|E_q[z|x]))."""
    torch.manual_seed(args.seed)
    z = torch.randn(10, net.latent_channels, net.latent_size, net.latent_size, device=device)
    originals = test_images[:10].to(device).float() / 255
    with autocast(device, dtype), torch.inference_mode():
        rows = [("sample of p(x|z)", decode_images(net, z)),
                ("its mean E[x|z]", decode_images(net, z, False)),
                ("mean, T = 0.7", decode_images(net, 0.7 * z, False)), ("test image", originals),
                ("reconstruction", decode_images(net, net.encode(originals * 2 - 1)[0], False))]
    common.save_rows(rows, run_dir / "samples" / f"epoch_{epoch:04d}.png",
                     title=f"epoch {epoch}: z ~ N(0, T^2 I) decoded once (1 network evaluation)")


def train(args, view=None):
    if getattr(args, "views", None) and view is None:  # (a run of experiments/aasae.py)
        raise UserError(f"{args.resume} is an AASAE run: resume it with experiments/aasae.py")
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
    start, step, state = resume(args, net, ema, optimizer, scaler) if args.resume else \
        (0, 0, {"grad_norm_avg": torch.tensor(math.inf), "clipped_outliers": torch.tensor(0)})
    state = {k: v.to(device) for k, v in state.items()}  # the outlier rule's statistics
    run_dir, log = open_run(args, step) if rank == 0 else (None, None)
    if rank == 0:
        print(f"{run_dir}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_images)} images, {len(loader)} steps an epoch on {device} x {world}, "
              f"{dtype or torch.float32}")
        if step == 0:  # the starting point of the curve: bits/dim at initialisation
            log(0, epoch=0, **test_metrics(ema, test_images, args, device, dtype))
    streak = worst = torch.zeros((), device=device)  # divergence signs in a row, on the device
    for epoch in range(start + 1, args.epochs + 1):
        torch.manual_seed(args.seed * 10**9 + rank * 10**6 + epoch)  # each rank's and epoch's noise
        tick = time.perf_counter()
        for i, x in enumerate(tqdm(loader.epoch(epoch), f"epoch {epoch}", len(loader), leave=False,
                                   disable=rank != 0)):  # x: (B, 3, 32, 32) in [0, 1]
            lr, beta = schedule(step, len(loader), args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logs, bad = train_step(model, net, optimizer, scaler, x, beta, args, state, dtype, view)
            update_ema(ema, net, args.ema, step)
            step, streak = step + 1, (streak + 1) * bad
            worst = torch.maximum(worst, streak)
            if step % args.log_every == 0 or i == len(loader) - 1:  # the only host syncs
                if worst.item() >= args.max_bad_steps:
                    raise UserError(f"training diverged: a non-finite loss {args.max_bad_steps} "
                                    f"steps in a row by step {step}; the last good checkpoint is "
                                    f"in {args.resume or run_dir}: resume it with a lower --lr")
                if rank == 0:
                    log(step, epoch=epoch, **{k: v.item() for k, v in logs.items()}, lr=lr,
                        beta=beta, clipped_outliers=state["clipped_outliers"].item(),
                        img_per_s=(i + 1) * args.batch_size / (time.perf_counter() - tick))
        if rank == 0:  # end of epoch: evaluate, preview, checkpoint
            seconds = time.perf_counter() - tick
            test = test_metrics(ema, test_images, args, device, dtype)
            write_previews(ema, run_dir, epoch, args, device, dtype, test_images)
            log(step, epoch=epoch, epoch_seconds=seconds, **test)
            save_checkpoint(run_dir, args=vars(args), net=net.state_dict(), ema=ema.state_dict(),
                            optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                            precision=str(dtype), epoch=epoch, step=step, state=state)
            print(f"epoch {epoch}/{args.epochs}: test {describe(test, args)} ({seconds:.0f} s)")
        if world > 1:  # (if rank 0 failed above, torchrun stops the other processes)
            dist.barrier()
    if rank == 0:
        log.finish({"epochs": args.epochs, "steps": step, **test,
                    "parameters": sum(p.numel() for p in net.parameters())})
    return run_dir


NO_BOUND = "no bits/dim: --kl-weight {:g} trains Eq. (6), not the ELBO (see vae.py's docstring)"


def describe(result, args):
    """'6.2100 bits/dim (distortion 6.1 + rate 0.1)', or the two terms and why there is no total."""
    terms = f"distortion {result['test_distortion_bpd']:.4f} + rate {result['test_rate_bpd']:.4f}"
    if "test_bpd" in result:
        return f"{result['test_bpd']:.4f} bits/dim ({terms})"
    return f"{terms} (bits/dim each); {NO_BOUND.format(args.kl_weight)}"


# ----------------------------------------------------------------------------------------------
# Commands: sample, evaluate (experiments/vae_interpolate.py and vae_probe.py analyse a run)
# ----------------------------------------------------------------------------------------------

def load_trained(run, args, device):
    """The run's EMA network, ready to sample, and its state (the outlier rule's statistics)."""
    net, _, _, _ = build(args, device)
    ckpt = load_checkpoint(run, ema=net)
    return net.eval().requires_grad_(False), ckpt["state"]


def draw_samples(net, n, args, device, dtype, drawn=True):
    """n decoded prior draws z ~ N(0, T^2 I) (T: --temperature, the z from --seed), float in [0, 1]
    on the CPU, in batches of --batch-size: samples of p(x|z), or with drawn=False their means."""
    torch.manual_seed(args.seed)  # the same z for the samples and for their means
    out = []
    for start in range(0, n, args.batch_size):
        z = args.temperature * torch.randn(min(args.batch_size, n - start), net.latent_channels,
                                           net.latent_size, net.latent_size, device=device)
        with autocast(device, dtype):
            out.append(decode_images(net, z, drawn).float().cpu())
    return torch.cat(out)


def sample(args):
    """RUN/samples.png (samples of p(x|z)) and samples.npz (uint8, NHWC): 'samples', and 'means'
    E[x|z] of the same z."""
    device, _, _ = setup_device(args)
    dtype, (net, _) = amp_dtype(args, device), load_trained(args.sample, args, device)
    drawn, means = [draw_samples(net, args.n, args, device, dtype, d) for d in (True, False)]
    run = Path(args.sample)
    common.save_grid(drawn[:256], run / "samples.png", caption=f"samples of p(x|z), z ~ N(0, "
                     f"{args.temperature:g}^2 I): one decoder evaluation each")
    nhwc = lambda images: common.to_uint8(images).permute(0, 2, 3, 1).numpy()  # noqa: E731
    np.savez_compressed(run / "samples.npz", samples=nhwc(drawn), means=nhwc(means))
    print(f"wrote {args.n} samples (T = {args.temperature:g}) to {run}/samples.png and samples.npz")


def evaluate(args):
    """Test bits/dim (ELBO and IWAE), FID / IS / KID of --n samples of p(x|z) and, labelled means_*,
    of their means E[x|z], into RUN/eval.json."""
    common.check_metrics(args.n, args.fid_extractor, args.fid_weights)  # before any sampling
    device, _, _ = setup_device(args)
    dtype, (net, _) = amp_dtype(args, device), load_trained(args.eval, args, device)
    test_images = common.load_images(args.data, args.data_root, "test")[:args.limit_test]
    iw_samples = args.iw_samples if args.kl_weight == 1 else 0
    result = test_metrics(net, test_images, args, device, dtype, iw_samples)
    if not iw_samples:
        result["bits_per_dim"] = NO_BOUND.format(args.kl_weight)
    start = time.perf_counter()
    drawn = draw_samples(net, args.n, args, device, dtype)
    seconds = time.perf_counter() - start
    fid = (args.data, args.data_root, args.fid_extractor, args.fid_weights, device)
    result.update(common.generative_metrics(drawn, *fid), n_test=len(test_images), nfe_per_sample=1,
                  sampling_seconds_per_1000=1000 * seconds / args.n, temperature=args.temperature)
    means = common.generative_metrics(draw_samples(net, args.n, args, device, dtype, False), *fid)
    result.update({f"means_{k}": means[k] for k in ("fid", "is_mean", "kid_mean")})
    (Path(args.eval) / "eval.json").write_text(json.dumps(result, indent=2))
    iwae = f", IWAE (K = {iw_samples}) {result['test_iwae_bpd']:.4f}" if iw_samples else ""
    print(f"test {describe(result, args)}{iwae}; samples: FID {result['fid']:.2f}, IS "
          f"{result['is_mean']:.2f}, their means: FID {result['means_fid']:.2f}; "
          f"{result['n_samples']} each ({args.fid_extractor}): {args.eval}/eval.json")


RECIPE = dict(epochs=200, lr=5e-4, ema=0.999, grad_clip=20.0)
COMMANDS = ("resume", "sample", "eval")  # the flags that name a run


def add_model_args(p):
    add = p.add_argument
    add("--temperature", type=positive_float, default=1.0, help="the prior's std when sampling")
    add("--iw-samples", type=positive_int, default=100, help="K of the IWAE bound in --eval")
    add("--width", type=positive_int, default=128, help="channels at 32x32 (2x that below)")
    add("--blocks", type=positive_int, default=3, help="residual blocks per resolution")
    add("--latent-channels", type=positive_int, default=32, help="channels C of the latent map z")
    add("--latent-size", type=int, choices=[4, 8, 16], default=8, help="z is C x size x size")
    add("--mixtures", type=positive_int, default=10, help="logistic components per pixel")
    add("--kl-weight", type=non_negative_float, default=1.0, help="beta of Eq. (6): 1 is the VAE")
    add("--kl-warmup", type=non_negative_float, default=5.0, help="epochs of beta's rise (0: off)")
    add("--free-bits", type=non_negative_float, default=0.05, help="lambda, nats a latent (0: off)")
    add("--weight-decay", type=non_negative_float, default=0.01, help="AdamW's weight decay")
    add("--warmup-steps", type=non_negative_float, default=200, help="linear learning-rate warm-up")
    add("--skip-factor", type=positive_float, default=10.0,
        help="clip a gradient norm beyond this many times its running average to that")


def check_model_args(args, error):
    pass  # every value of vae.py's own flags is valid


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
