"""An energy-based model (EBM) of CIFAR-10, trained by contrastive divergence with SGLD.

    python ebm.py --epochs 200                    # IGEBM's unconditional CIFAR-10 model, one GPU
    python ebm.py --sample runs/RUN --n 64        # samples.png and samples.npz
    python ebm.py --eval runs/RUN --n 10000       # FID / IS / KID and the energies
    python experiments/ebm_inpaint.py runs/RUN    # fill in the centre of test images
    python -m experiments.ebm_toy                 # the same method on a 2-D toy, a minute
    torchrun --standalone --nproc_per_node=8 ebm.py --epochs 200

A network E_theta maps an image x to one number, its energy, and defines the density p_theta(x) =
exp(-E_theta(x)) / Z(theta), Z(theta) = integral exp(-E_theta(x)) dx: low energy, a likely image.
Z is intractable, but grad_theta log Z = -E_{x ~ p_theta}[grad_theta E_theta(x)], so

    grad_theta E_data[-log p_theta(x)] = E_{x+ ~ data}[grad E(x+)] - E_{x- ~ p_theta}[grad E(x-)]

pushes the energy of data (positives x+) down and that of the model's samples (negatives x-) up,
until the two balance. Contrastive divergence (Hinton 2002) draws the negatives by a short MCMC run
and treats them as constants: the loss is E(x+) - E(x-). IGEBM (Du & Mordatch 2019,
https://arxiv.org/abs/1903.08689) adds alpha (E(x+)^2 + E(x-)^2), alpha = 1, which keeps the
energies near 0 so that the first two terms cannot win by running off to infinity.

Stochastic gradient Langevin dynamics (SGLD, Welling & Teh 2011), x <- x - (eps / 2) grad_x E(x) +
sqrt(eps) N(0, I), samples p_theta as eps -> 0 and the steps -> infinity. IGEBM runs K = 60 steps
of x <- clamp(x - lambda clip(grad_x E, +-0.01) + N(0, 0.005^2), 0, 1), lambda = 10: not in
Langevin's proportion (that needs noise sqrt(2 lambda)), it samples exp(-E / T) at T ~ 1e-6, close
to noisy gradient descent: sharper images from short chains. The chains persist across updates in
a replay buffer of 10,000 past negatives, 5% restarted from noise (persistent CD, Tieleman 2008;
Nijkamp et al. 2019, https://arxiv.org/abs/1904.09770, study short-run chains instead).

A density needs continuous data: pixels k/255 become (k + u) / 256, u ~ U(0, 1). EBM training blows
up in the end (JEM's and VAEBM's authors say so); their remedy, a restart from the last good
checkpoint at a lower learning rate, is automatic here. Reported FID (theirs): IGEBM 40.58,
short-run MCMC 44.5, improved CD (Du et al. 2021) 25.1. -E(x) also scores out-of-distribution
images, as in IGEBM and JEM (Grathwohl et al. 2020): experiments/ebm_ood.py.
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
from torch.nn.utils import parametrize
from tqdm import tqdm

import common
from common import UserError, decay, non_negative_float, positive_float, positive_int, run_name

MODEL = "ebm"


# ----------------------------------------------------------------------------------------------
# The network: IGEBM's unconditional ResNet32Large (its official code, models.py)
# ----------------------------------------------------------------------------------------------
# No BatchNorm: an image's energy must not depend on its batch. Spectral normalisation bounds each
# conv's Lipschitz constant (the gains and the last layer are free). Unlike IGEBM: SiLU for its
# leaky ReLU (SGLD follows grad_x E, piecewise constant under ReLU, smooth under SiLU), and ordinary
# conv biases for its learned bias on a conv's input (not the same near the zero-padded border).

class SpectralNorm(nn.Module):
    """W -> W / sigma(W), sigma the largest singular value of W (out, in k k), by power iteration
    (Miyato et al. 2018), a step per forward in training; at_most_one: W / max(sigma, 1)."""

    def __init__(self, weight, at_most_one=False, warmup=15):
        super().__init__()
        self.at_most_one, w = at_most_one, weight.detach().flatten(1)
        u, v = F.normalize(torch.randn(len(w)), dim=0), None
        for _ in range(warmup):  # start from a converged estimate
            v = F.normalize(w.T @ u, dim=0)
            u = F.normalize(w @ v, dim=0)
        self.register_buffer("u", u), self.register_buffer("v", v)

    def forward(self, weight):
        with torch.autocast(weight.device.type, enabled=False):  # float32: sigma is one number
            w = weight.flatten(1)
            if self.training:
                with torch.no_grad():
                    self.v.copy_(F.normalize(w.T @ self.u, dim=0))
                    self.u.copy_(F.normalize(w @ self.v, dim=0))
            # u^T W v (clones: the next power step, in place, must not change this backward's u, v)
            sigma = self.u.clone() @ w @ self.v.clone()
            return weight / (sigma.clamp(min=1) if self.at_most_one else sigma)


def spectral_norm(layer, at_most_one=False):
    norm = SpectralNorm(layer.weight, at_most_one)
    return parametrize.register_parametrization(layer, "weight", norm)


def dropout(h, p, training):
    """Dropout, its mask from torch.rand on the CPU (F.dropout's bernoulli_ costs 4x as much)."""
    if not training or p == 0 or h.device.type != "cpu":
        return F.dropout(h, p, training)
    return h * (torch.rand_like(h) >= p) * (1 / (1 - p))


class ResBlock(nn.Module):
    """silu(skip(x) + g conv2(silu(dropout(conv1(x))))), average-pooled after the sum if down."""

    def __init__(self, c_in, c_out, down, dropout):
        super().__init__()
        self.conv1 = spectral_norm(nn.Conv2d(c_in, c_out, 3, padding=1))
        conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.normal_(conv2.weight, std=1e-10), nn.init.zeros_(conv2.bias)  # branch ~0 at first
        self.conv2 = spectral_norm(conv2, at_most_one=True)  # / max(sigma, 1) keeps it so
        self.gain = nn.Parameter(torch.ones(c_out, 1, 1))  # the branch may grow past SN's bound 1
        shortcut = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.skip = spectral_norm(shortcut) if c_in != c_out else nn.Identity()
        self.down, self.dropout = down, dropout

    def forward(self, x):
        h = F.silu(dropout(self.conv1(x), self.dropout, self.training))
        out = self.skip(x) + self.gain * self.conv2(h)
        return F.silu(F.avg_pool2d(out, 2) if self.down else out)


class EnergyNet(nn.Module):
    """(B, 3, 32, 32) in [0, 1] -> energies (B,): 3 blocks each at width, 2 width and 4 width, the
    first of each halving the resolution (32 -> 16 -> 8 -> 4), sum pooling, a linear layer. 18.6M
    parameters at width 128; dropout 0.5 in every block, in training and in its chains (IGEBM)."""

    def __init__(self, width=128, dropout=0.5):
        super().__init__()
        self.stem = spectral_norm(nn.Conv2d(3, width, 3, padding=1, bias=False))
        channels = [width] * 3 + [2 * width] * 3 + [4 * width] * 3
        pairs = enumerate(zip([width, *channels], channels))
        self.blocks = nn.Sequential(*[ResBlock(a, b, i % 3 == 0, dropout) for i, (a, b) in pairs])
        self.head = nn.Linear(4 * width, 1)  # no spectral norm: it only scales E (IGEBM)

    def forward(self, x):
        h = self.blocks(F.silu(self.stem(x)))  # (B, 4 width, 4, 4)
        return self.head(h.sum((2, 3))).squeeze(1)


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------

def contrastive_divergence_loss(energy_pos, energy_neg, alpha):
    """L = mean E(x+) - mean E(x-) + alpha (mean E(x+)^2 + mean E(x-)^2) (IGEBM). The negatives come
    from SGLD as constants: the first two terms' gradient is the maximum-likelihood gradient."""
    penalty = (energy_pos**2).mean() + (energy_neg**2).mean()
    return energy_pos.mean() - energy_neg.mean() + alpha * penalty


# ----------------------------------------------------------------------------------------------
# The sampler: SGLD, and the replay buffer its chains persist in
# ----------------------------------------------------------------------------------------------

def sgld(energy, x, steps, step_size, noise, grad_clip=None, bounds=(0.0, 1.0), mask=None):
    """K steps of x <- clamp(x - step_size clip(grad_x E(x)) + noise N(0, I), bounds): Langevin
    dynamics sampling exp(-E) when step_size = eps / 2, noise = sqrt(eps), no clip and no bounds.
    `mask` (1 = free) moves only some pixels. Returns (x, mean norm of grad_x E over the steps)."""
    grad_norm, x = torch.zeros((), device=x.device), x.detach()
    with parametrize.cached():  # the normalised weights: computed once per chain, not every step
        for _ in range(steps):
            grad = energy_gradient(energy, x)
            grad_norm += grad.flatten(1).norm(dim=1).mean() / steps
            if grad_clip is not None:
                grad = torch.nan_to_num(grad).clamp(-grad_clip, grad_clip)
            move = -step_size * grad + noise * torch.randn_like(x)
            x = x.detach() + (move if mask is None else move * mask)
            x = x if bounds is None else x.clamp(*bounds)
    return x, grad_norm


def energy_gradient(energy, x):
    """grad_x E(x), for x only. The energy is scaled by 1024 first and the gradient back after:
    under float16 (T4, V100) most of its entries, of median size 1e-6 at initialisation, fall below
    float16's smallest normal number (5% error, 2% zeros if not)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(energy(x).sum() * 1024, x)[0].float() / 1024


def igebm_sgld(net, x, steps, args, dtype, mask=None):
    """sgld on the network's energy with the run's step size, noise and clip, under autocast."""
    with autocast(x.device, dtype):
        return sgld(lambda v: net(v).float(), x, steps, args.sgld_step_size, args.sgld_noise,
                    args.sgld_grad_clip, mask=mask)


class ReplayBuffer:
    """IGEBM's replay buffer: persistent chains, a few restarted from uniform noise each batch."""

    def __init__(self, size, shape, device, restart_rate=0.05, low=0.0, high=1.0):
        self.restart_rate, self.low, self.high = restart_rate, low, high
        self.samples = self.noise(size, shape, device)  # (size, *shape): pure noise at first

    def noise(self, n, shape, device):
        return self.low + (self.high - self.low) * torch.rand(n, *shape, device=device)

    def sample(self, n):
        """n chain states, each restarted from noise with probability restart_rate, and their slots
        (distinct: pushing them back is deterministic on a GPU too)."""
        idx = torch.randperm(len(self.samples), device=self.samples.device)[:n]
        x, fresh = self.samples[idx], self.noise(n, self.samples.shape[1:], self.samples.device)
        restart = torch.rand(n, device=x.device) < self.restart_rate
        return torch.where(restart.view(-1, *[1] * (x.dim() - 1)), fresh, x), idx

    def push(self, x, idx):  # the chains' new states, into the slots they came from
        self.samples[idx] = x.detach()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def build(args, device):
    """The network (channels_last on a GPU: faster), its EMA copy, the optimiser and the scaler."""
    net = EnergyNet(args.width, args.dropout).to(device)
    net = net.to(memory_format=torch.channels_last) if device.type == "cuda" else net
    ema = copy.deepcopy(net).requires_grad_(False)  # IGEBM has none: --ema 0, a copy of the net
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.0, 0.999), fused=True)
    return net, ema, optimizer, grad_scaler(device, amp_dtype(args, device))


@torch.no_grad()  # the average is not part of any graph (under autograd it would grow every step)
def update_ema(ema, net, decay, step):
    """ema <- d ema + (1 - d) net, d = min(decay, (1 + step) / (10 + step)); buffers copied."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p, 1 - d)
    for e, b in zip(ema.buffers(), net.buffers()):  # the spectral norms' power-iteration vectors
        e.copy_(b)


def clip_like_igebm(optimizer):
    """IGEBM's clip (its custom Adam): each gradient entry to +-(3 sqrt(v_hat) + 0.1), v_hat = v_t /
    (1 - beta2^(t+1)) as IGEBM corrects it: no entry beyond three running standard deviations (0.1
    at the first step). Not an Adam (no betas, e.g. SGD): left alone."""
    for group in (g for g in optimizer.param_groups if "betas" in g):
        for p in group["params"]:
            state, beta2 = optimizer.state[p], group["betas"][1]
            if p.grad is not None and "exp_avg_sq" in state:
                bound = 3 * (state["exp_avg_sq"] / (1 - beta2 ** (state["step"] + 1))).sqrt() + 0.1
                p.grad.copy_(torch.minimum(torch.maximum(p.grad, -bound), bound))
            elif p.grad is not None and not state:
                p.grad.clamp_(-0.1, 0.1)


def train_step(model, net, optimizer, scaler, buffer, x, args, dtype):
    """One contrastive-divergence update on a batch x (B, 3, 32, 32) in [0, 1], all on the device.
    Returns ({name: tensor} to log, bad: a divergence, energies not finite or over --max-energy)."""
    x_pos = (x * 255 + torch.rand_like(x)) / 256  # dequantization: a density over [0, 1]
    x_neg, idx = buffer.sample(len(x_pos))
    # The chains need grad_x E only (a compiled backward would compute the weights' gradients too).
    # The network stays in training mode: dropout is on in the chains as in IGEBM's training graph.
    net.requires_grad_(False)
    x_neg, sgld_grad_norm = igebm_sgld(net, x_neg, args.sgld_steps, args, dtype)
    net.requires_grad_(True)
    buffer.push(x_neg, idx)
    with autocast(x.device, dtype):
        energies = model(torch.cat([x_pos, x_neg])).float()  # one forward: one DDP all-reduce
    bad = ~torch.isfinite(energies).all() | (energies.abs().max() > args.max_energy)
    if dist.is_initialized():  # every rank must skip, and roll back, at the same steps
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # (a collective on the device: no host sync)
    e_pos, e_neg = energies.chunk(2)
    loss = contrastive_divergence_loss(e_pos, e_neg, args.alpha)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss * torch.where(bad, math.nan, 1.0)).backward()  # bad: NaN, the step skipped
    scaler.unscale_(optimizer)  # the gradients' true size (under float16) before clipping
    grad_norm = nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip or math.inf)
    clip_like_igebm(optimizer)
    scaler.step(optimizer)
    scaler.update()
    e_pos, e_neg = e_pos.mean().detach(), e_neg.mean().detach()
    return {"loss": loss.detach(), "energy_pos": e_pos, "energy_neg": e_neg, "gap": e_neg - e_pos,
            "grad_norm": grad_norm, "sgld_grad_norm": sgld_grad_norm}, bad


@torch.no_grad()
def test_metrics(net, images, args, device, dtype):
    """The mean energy of the test images at the centres of their dequantization bins (E(x+) is on
    the training images); dropout off and no power iteration: measuring changes nothing."""
    with autocast(device, dtype):
        energy = torch.cat([net.eval()((b.to(device).float() + 0.5) / 256).float()
                            for b in images.split(args.batch_size)])
    net.train()
    return {"test_energy": energy.mean().item()}


@torch.no_grad()
def write_previews(net, buffer, run_dir, epoch, args, device, dtype):
    """samples/epoch_NNNN.png: the replay buffer (IGEBM's samples, where the chains stand) and SGLD
    chains of K steps from the same uniform noise every epoch, at steps 0, K/4, K/2, 3K/4 and K."""
    net.eval()
    rows = [("replay buffer", buffer.samples[:8])]
    for steps in [round(k * args.sgld_steps / 4) for k in range(5)]:
        torch.manual_seed(0)  # the same start and noise for every row: one chain, seen at 5 points
        x = igebm_sgld(net, torch.rand(8, 3, 32, 32, device=device), steps, args, dtype)[0]
        rows.append((f"{steps} steps from noise", x))
    net.train()
    common.save_rows(rows, run_dir / "samples" / f"epoch_{epoch:04d}.png",
                     title=f"epoch {epoch}: SGLD (each step one network evaluation)")


def share_buffer(buffer, world, rank, saved=None):
    """The whole replay buffer, gathered from every rank (call it on all); or with `saved`, this
    rank's equal share of a saved one for any number of processes, its chains repeated if too few
    (an unequal split would break the collective that gathers them)."""
    if saved is not None:
        n = len(buffer.samples)
        mine = torch.arange(rank * n, (rank + 1) * n) % len(saved)
        buffer.samples = saved[mine].to(buffer.samples.device)
    elif world > 1:
        parts = [torch.empty_like(buffer.samples) for _ in range(world)]
        dist.all_gather(parts, buffer.samples)
        return torch.cat(parts)
    return buffer.samples


def train(args):
    device, rank, world = setup_device(args)  # device and DDP
    dtype = amp_dtype(args, device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP checks it)
    train_images = common.load_images(args.data, args.data_root, "train")[:args.limit_train]
    test_images = common.load_images(args.data, args.data_root, "test")[:args.limit_test]
    loader = common.DeviceLoader(train_images, args.batch_size // world, device, args.seed, rank,
                                 world, flip=False)  # IGEBM's unconditional run does not augment
    net, ema, optimizer, scaler = build(args, device)
    model = torch.compile(net) if args.compile else net
    model = DistributedDataParallel(model) if world > 1 else model
    parameters = sum(p.numel() for p in net.parameters())
    torch.manual_seed(args.seed * 10**9 + rank * 10**6)  # each rank starts its own chains
    buffer = ReplayBuffer(args.buffer_size // world, (3, 32, 32), device, args.restart_rate)
    start, step, state = resume(args, net, ema, optimizer, scaler) if args.resume else \
        (0, 0, {"rollbacks": 0})
    if args.resume:
        share_buffer(buffer, world, rank, saved=state["buffer"])
    run_dir, log = open_run(args, step) if rank == 0 else (None, None)
    if rank == 0:
        print(f"{run_dir}: {parameters / 1e6:.2f}M parameters, {len(train_images)} images, "
              f"{len(loader)} steps an epoch on {device} x {world}, {dtype or torch.float32}")
    streak = worst = torch.zeros((), device=device)  # divergence signs in a row, on the device
    for epoch in range(start + 1, args.epochs + 1):
        torch.manual_seed(args.seed * 10**9 + rank * 10**6 + epoch)  # each rank's and epoch's noise
        last_good = copy.deepcopy([net.state_dict(), optimizer.state_dict(), scaler.state_dict(),
                                   buffer.samples])  # what a rollback restores
        tick = time.perf_counter()
        for i, x in enumerate(tqdm(loader.epoch(epoch), f"epoch {epoch}", len(loader), leave=False,
                                   disable=rank != 0)):  # x: (B, 3, 32, 32) in [0, 1]
            logs, bad = train_step(model, net, optimizer, scaler, buffer, x, args, dtype)
            update_ema(ema, net, args.ema, step)
            step, streak = step + 1, (streak + 1) * bad
            worst = torch.maximum(worst, streak)
            if step % args.log_every == 0 or i == len(loader) - 1:  # the only host syncs
                if worst.item() >= args.max_bad_steps:  # the EBM's own remedy (JEM's, VAEBM's)
                    roll_back(last_good, (net, optimizer, scaler), buffer, state, args, step,
                              run_dir, log)
                    streak = worst = torch.zeros((), device=device)
                elif rank == 0:
                    log(step, epoch=epoch, **{k: v.item() for k, v in logs.items()},
                        lr=optimizer.param_groups[0]["lr"],
                        img_per_s=(i + 1) * args.batch_size / (time.perf_counter() - tick))
        state["buffer"] = share_buffer(buffer, world, rank)
        if rank == 0:  # end of epoch: evaluate, preview, checkpoint
            seconds = time.perf_counter() - tick
            test = test_metrics(ema, test_images, args, device, dtype)
            write_previews(ema, buffer, run_dir, epoch, args, device, dtype)
            log(step, epoch=epoch, epoch_seconds=seconds, **test)
            save_checkpoint(run_dir, args=vars(args), net=net.state_dict(), ema=ema.state_dict(),
                            optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                            precision=str(dtype), epoch=epoch, step=step, state=state)
            print(f"epoch {epoch}/{args.epochs}: gap E(x-) - E(x+) {logs['gap'].item():.4f}, "
                  f"test E {test['test_energy']:.4f} ({seconds:.0f} s)")
        if world > 1:  # (if rank 0 failed above, torchrun stops the other processes)
            dist.barrier()
    if rank == 0:
        log.finish({"epochs": args.epochs, "steps": step, **test, "rollbacks": state["rollbacks"],
                    "lr": optimizer.param_groups[0]["lr"], "parameters": parameters})
    return run_dir


def roll_back(last_good, trained, buffer, state, args, step, run_dir, log):
    """Back to the weights, optimiser, loss scale and replay buffer of the last checkpoint, at a
    lower lr. trained: (net, optimizer, scaler); float16's scale, halved at every bad step, would
    otherwise stay 2^-34 after 50 of them, and every gradient underflow to zero."""
    rollbacks = state["rollbacks"]
    if rollbacks >= args.max_rollbacks:
        raise UserError(f"the energy diverged (not finite, or |E| > {args.max_energy:g}) at step "
                        f"{step} after {rollbacks} rollback(s); the last good checkpoint is in "
                        f"{args.resume or run_dir}: resume it with a lower --lr or larger --alpha")
    net, optimizer, scaler = trained
    weights, moments, scale, buffer.samples = copy.deepcopy(last_good)  # (kept for another one)
    net.load_state_dict(weights), optimizer.load_state_dict(moments), scaler.load_state_dict(scale)
    state["rollbacks"], lr = rollbacks + 1, optimizer.param_groups[0]["lr"] * args.lr_drop
    for group in optimizer.param_groups:
        group["lr"] = lr
    if log:
        print(f"divergence at step {step}: rolled back to the last checkpoint, lr lowered to "
              f"{lr:.3g} (rollback {rollbacks + 1} of {args.max_rollbacks} at most)",
              file=sys.stderr)
        log(step, rollback=rollbacks + 1, lr=lr)


# ----------------------------------------------------------------------------------------------
# Commands: sample, evaluate
# ----------------------------------------------------------------------------------------------

def load_trained(run, args, device):
    """The run's EMA network (dropout off), ready to sample, and its state (the replay buffer)."""
    net, _, _, _ = build(args, device)
    ckpt = load_checkpoint(run, ema=net)
    return net.eval().requires_grad_(False), ckpt["state"]


def draw_samples(net, state, n, args, device, dtype):
    """n samples: SGLD chains of --steps steps from the saved replay buffer (IGEBM) or noise."""
    saved = state["buffer"]
    start = saved[torch.randperm(len(saved)).repeat(math.ceil(n / len(saved)))[:n]] \
        if args.chains == "buffer" else torch.rand(n, 3, 32, 32)
    return torch.cat([igebm_sgld(net, x.to(device), args.steps, args, dtype)[0].cpu()
                      for x in start.split(args.batch_size)])


def sample(args):
    """RUN/samples.png and samples.npz (uint8, NHWC)."""
    device, _, _ = setup_device(args)
    net, state = load_trained(args.sample, args, device)
    torch.manual_seed(args.seed)
    x = draw_samples(net, state, args.n, args, device, amp_dtype(args, device))
    run = Path(args.sample)
    start = "the replay buffer" if args.chains == "buffer" else "uniform noise"
    what = f"SGLD from {start}, {args.steps} steps (network evaluations)"
    common.save_grid(x, run / "samples.png", caption=f"{args.n} samples: {what}")
    np.savez_compressed(run / "samples.npz", samples=common.to_uint8(x).permute(0, 2, 3, 1).numpy())
    print(f"wrote {len(x)} samples ({what}) to {run}/samples.png and samples.npz")


def evaluate(args):
    """FID / IS / KID of --n samples and the mean energies of test images and samples: eval.json."""
    common.check_metrics(args.n, args.fid_extractor, args.fid_weights)  # before any sampling
    device, _, _ = setup_device(args)
    dtype, (net, state) = amp_dtype(args, device), load_trained(args.eval, args, device)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    samples = draw_samples(net, state, args.n, args, device, dtype)
    seconds = time.perf_counter() - start
    result = common.generative_metrics(samples, args.data, args.data_root, args.fid_extractor,
                                       args.fid_weights, device)
    test = common.load_images(args.data, args.data_root, "test")[:args.limit_test]
    with torch.no_grad(), autocast(device, dtype):
        for name, x in (("test", (test.float() + 0.5) / 256), ("samples", samples)):
            energies = [net(b.to(device)).float() for b in x.split(args.batch_size)]
            result[f"energy_{name}"] = torch.cat(energies).mean().item()
    result.update(steps=args.steps, chains=args.chains, nfe_per_sample=args.steps,
                  sampling_seconds_per_1000=1000 * seconds / args.n)
    (Path(args.eval) / "eval.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


RECIPE = dict(epochs=200, lr=3e-4, ema=0.0, grad_clip=0.0)  # IGEBM: no EMA, IGEBM's clip (above)
COMMANDS = ("resume", "sample", "eval")  # the flags that name a run


def add_model_args(p):
    add = p.add_argument
    add("--steps", type=positive_int, help="SGLD steps of --sample and --eval (default: K)")
    add("--chains", default="buffer", choices=("buffer", "noise"),
        help="--sample / --eval chains start from the saved replay buffer (IGEBM) or from U(0, 1)")
    add("--width", type=positive_int, default=128, help="channels of the first stage (IGEBM: 128)")
    add("--dropout", type=float, default=0.5, help="dropout in every block (IGEBM: 0.5)")
    add("--alpha", type=non_negative_float, default=1.0, help="weight of E(x+)^2 + E(x-)^2")
    add("--sgld-steps", type=positive_int, default=60, help="SGLD steps K per update (IGEBM: 60)")
    add("--sgld-step-size", type=positive_float, default=10.0, help="SGLD step lambda (IGEBM: 10)")
    add("--sgld-noise", type=non_negative_float, default=0.005, help="SGLD noise std (IGEBM)")
    add("--sgld-grad-clip", type=positive_float, default=0.01, help="clip grad_x E to +-this")
    add("--buffer-size", type=positive_int, default=10000, help="replay buffer, all processes")
    add("--restart-rate", type=float, default=0.05, help="chains restarted from U(0, 1)")
    add("--max-energy", type=positive_float, default=1000.0, help="|E| beyond this: a divergence")
    add("--max-rollbacks", type=int, default=3, help="rollbacks to the last checkpoint, at most")
    add("--lr-drop", type=float, default=0.5, help="multiply the lr by this at a rollback")


def check_model_args(args, error):
    args.steps = args.steps or args.sgld_steps
    if not (0 <= args.dropout < 1 and 0 <= args.restart_rate <= 1 and 0 <= args.lr_drop <= 1):
        error(f"--dropout must be in [0, 1), --restart-rate and --lr-drop in [0, 1]; got "
              f"{args.dropout}, {args.restart_rate}, {args.lr_drop}")
    if args.max_rollbacks < 0 or args.buffer_size < args.batch_size:
        error(f"--max-rollbacks must be >= 0 (got {args.max_rollbacks}) and --buffer-size at least "
              f"--batch-size (got {args.buffer_size})")


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
