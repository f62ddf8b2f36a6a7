"""An energy-based model (EBM) of CIFAR-10, trained by contrastive divergence with SGLD.

    python ebm.py --epochs 200                       # IGEBM's unconditional CIFAR-10 model, one GPU
    python ebm.py --sample runs/RUN --n 64           # samples.png and samples.npz
    python ebm.py --eval runs/RUN --n 10000          # FID / IS / KID and the energies
    python ebm.py --inpaint runs/RUN                 # fill in the centre of test images
    python -m experiments.ebm_toy                    # the same method on a 2-D toy, a minute
    torchrun --standalone --nproc_per_node=8 ebm.py --epochs 200

The model. A network E_theta maps an image x to one number, its energy, and defines the density
p_theta(x) = exp(-E_theta(x)) / Z(theta), Z(theta) = integral exp(-E_theta(x)) dx. Low energy means
a likely image. Z is intractable, but its gradient is an expectation under the model, grad_theta
log Z = -E_{x ~ p_theta}[grad_theta E_theta(x)], so the maximum-likelihood gradient is

    grad_theta E_data[-log p_theta(x)] = E_{x+ ~ data}[grad E(x+)] - E_{x- ~ p_theta}[grad E(x-)]

Push the energy of data (positives x+) down and that of the model's own samples (negatives x-)
up; at the optimum the two balance. Contrastive divergence (Hinton 2002) draws the negatives by a
short MCMC run and treats them as constants: the loss is E(x+) - E(x-). IGEBM (Du & Mordatch 2019,
https://arxiv.org/abs/1903.08689) adds alpha (E(x+)^2 + E(x-)^2), which keeps the energies near 0
so that the first two terms cannot win by running off to infinity (alpha = 1; Adam, lr 3e-4,
betas (0, 0.999), each gradient entry clipped to 3 of its running standard deviations + 0.1).

The sampler is stochastic gradient Langevin dynamics (SGLD, Welling & Teh 2011): x <- x - (eps / 2)
grad_x E(x) + sqrt(eps) N(0, I) samples p_theta as eps -> 0 and the steps -> infinity. IGEBM runs
K = 60 steps of x <- clamp(x - lambda clip(grad_x E, +-0.01) + N(0, 0.005^2), 0, 1), lambda = 10:
not in Langevin's proportion (it would need noise sqrt(2 lambda)), so it samples exp(-E / T) at
T ~ 1e-6, close to noisy gradient descent: sharper images from short chains. The chains start from
a replay buffer of 10,000 past negatives (5% restart from uniform noise), so a chain continues
across training steps (persistent CD, Tieleman 2008) and 60 steps an update add up to thousands
(Nijkamp et al. 2019, https://arxiv.org/abs/1904.09770, study short-run chains instead).

A density needs continuous data: pixels k/255 become (k + u) / 256, u ~ U(0, 1) (dequantization).
EBM training is unstable: the energies blow up in the end (JEM's and VAEBM's authors say so), and
their remedy, a restart from the last good checkpoint with a lower learning rate, is automatic
here. -E(x) is an unnormalised log-likelihood: experiments/ebm_ood.py scores out-of-distribution
images with it, as IGEBM and JEM (Grathwohl et al. 2020) do. Reported (theirs): IGEBM FID 40.58;
short-run MCMC 44.5; improved contrastive divergence (Du et al. 2021) 25.1.
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
from common import UserError, non_negative_float, positive_float, positive_int, run_name

MODEL = "ebm"


# ----------------------------------------------------------------------------------------------
# The network: IGEBM's unconditional ResNet32Large (its official code, models.py)
# ----------------------------------------------------------------------------------------------
# A stem conv and nine residual blocks, three each at 128, 256 and 512 channels, the first of each
# width halving the resolution (32 -> 16 -> 8 -> 4), sum pooling, a linear layer: 18.6M parameters.
# Dropout 0.5 in every block, in training and its chains (IGEBM's training graph runs the chains
# through the same forward). No BatchNorm: an image's energy must not depend on its batch. Spectral
# normalisation bounds each conv's Lipschitz constant: the energy cannot become arbitrarily steep.
# Two differences from IGEBM: SiLU for its leaky ReLU, as SGLD follows grad_x E, which (leaky) ReLU
# makes piecewise constant and SiLU smooth; and ordinary conv biases where IGEBM adds a learned bias
# to a conv's input, which is not the same near the zero-padded border (and is tied to the weights).

class SpectralNorm(nn.Module):
    """The parametrisation W -> W / sigma(W), sigma the largest singular value of W as an (out,
    in k k) matrix, by power iteration (Miyato et al. 2018); at_most_one: W / max(sigma, 1), which
    leaves a small weight alone. A power-iteration step per forward in training, none in eval."""

    def __init__(self, weight, at_most_one=False, warmup=15):
        super().__init__()
        self.at_most_one = at_most_one
        w = weight.detach().flatten(1)
        u, v = F.normalize(torch.randn(len(w)), dim=0), None
        for _ in range(warmup):  # start from a converged estimate
            v = F.normalize(w.T @ u, dim=0)
            u = F.normalize(w @ v, dim=0)
        self.register_buffer("u", u)
        self.register_buffer("v", v)

    def forward(self, weight):
        with torch.autocast(weight.device.type, enabled=False):  # float32: sigma is one number
            w = weight.flatten(1)
            if self.training:
                with torch.no_grad():
                    self.v.copy_(F.normalize(w.T @ self.u, dim=0))
                    self.u.copy_(F.normalize(w @ self.v, dim=0))
            sigma = self.u.clone() @ w @ self.v.clone()  # u^T W v, differentiable in W (copies: the
            return weight / (sigma.clamp(min=1) if self.at_most_one else sigma)  # next power step
            # must not change what this one's backward needs)


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
        nn.init.normal_(conv2.weight, std=1e-10), nn.init.zeros_(conv2.bias)  # an identity at first
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
    """(B, 3, 32, 32) in [0, 1] -> energies (B,). Channels width, 2 width, 4 width."""

    def __init__(self, width=128, dropout=0.5):
        super().__init__()
        self.stem = spectral_norm(nn.Conv2d(3, width, 3, padding=1, bias=False))
        channels = [width] * 3 + [2 * width] * 3 + [4 * width] * 3
        pairs = enumerate(zip([width, *channels], channels))  # 32 -> 16 -> 8 -> 4: the first of
        self.blocks = nn.Sequential(*[ResBlock(a, b, i % 3 == 0, dropout)  # each width halves
                                      for i, (a, b) in pairs])
        self.head = nn.Linear(4 * width, 1)  # no spectral norm: it only scales E (IGEBM)

    def forward(self, x):
        h = self.blocks(F.silu(self.stem(x)))  # (B, 4 width, 4, 4)
        return self.head(h.sum((2, 3))).squeeze(1)  # sum pooling (IGEBM), a scalar per image


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
    `mask` (1 = free) restricts the moves to some pixels (inpainting). Returns (x, the mean norm of
    grad_x E over the steps)."""
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
    """grad_x E(x), for x only (no gradients for the weights). The energy is scaled by 1024 first
    and the gradient back after: under float16 (T4, V100) most of its entries, of median size 1e-6
    at initialisation, fall below float16's smallest normal number (5% error, 2% zeros if not)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(energy(x).sum() * 1024, x)[0].float() / 1024


class ReplayBuffer:
    """IGEBM's replay buffer: persistent chains, a few restarted from uniform noise each batch."""

    def __init__(self, size, shape, device, restart_rate=0.05, low=0.0, high=1.0):
        self.restart_rate, self.low, self.high = restart_rate, low, high
        self.samples = self.noise(size, shape, device)  # (size, *shape): pure noise at first

    def noise(self, n, shape, device):
        return self.low + (self.high - self.low) * torch.rand(n, *shape, device=device)

    def sample(self, n):
        """n chain states and their slots (distinct, so that pushing them back is deterministic on a
        GPU too); each restarts from fresh noise with probability restart_rate."""
        idx = torch.randperm(len(self.samples), device=self.samples.device)[:n]
        x, fresh = self.samples[idx], self.noise(n, self.samples.shape[1:], self.samples.device)
        restart = torch.rand(n, device=x.device) < self.restart_rate
        return torch.where(restart.view(-1, *[1] * (x.dim() - 1)), fresh, x), idx

    def push(self, x, idx):
        """Store the chains' new states in the slots they came from."""
        self.samples[idx] = x.detach()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def build(args, device):
    """The energy network (channels_last on a GPU: faster convolutions), its EMA copy (IGEBM has
    none: --ema 0 makes it a copy of the network), the optimiser and the gradient scaler."""
    net = EnergyNet(args.width, args.dropout).to(device)
    net = net.to(memory_format=torch.channels_last) if device.type == "cuda" else net
    ema = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.0, 0.999), fused=True)
    return net, ema, optimizer, grad_scaler(device, amp_dtype(args, device))


@torch.no_grad()  # the average is not part of any graph (under autograd it would grow every step)
def update_ema(ema, net, decay, step):
    """ema <- d ema + (1 - d) net with d = min(decay, (1 + step) / (10 + step)); the spectral norms'
    power-iteration vectors are copied."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p, 1 - d)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


def clip_like_igebm(optimizer):
    """IGEBM's clip (its custom Adam): each gradient entry to +-(3 sqrt(v_hat) + 0.1), v_hat Adam's
    bias-corrected second moment before this step: no entry beyond three of its running standard
    deviations (0.1 at the first step). An optimiser without Adam's state is left alone."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state, beta2 = optimizer.state[p], group.get("betas", (0, 0.999))[1]
            if p.grad is not None and "exp_avg_sq" in state:
                bound = 3 * (state["exp_avg_sq"] / (1 - beta2 ** (state["step"] + 1))).sqrt() + 0.1
                p.grad.copy_(torch.minimum(torch.maximum(p.grad, -bound), bound))
            elif p.grad is not None and not state:
                p.grad.clamp_(-0.1, 0.1)


def train_step(model, net, optimizer, scaler, buffer, x, args, dtype):
    """One contrastive-divergence update on a batch x (B, 3, 32, 32) in [0, 1]. Returns ({name:
    device tensor} to log, a device bool: the sign of a divergence, energies that are not finite or
    beyond --max-energy, whose update is skipped). On the device: the GPU never waits."""
    x_pos = (x * 255 + torch.rand_like(x)) / 256  # dequantization: a density over [0, 1]
    x_neg, idx = buffer.sample(len(x_pos))
    # The chains need grad_x E only (a compiled backward would compute the weights' gradients too).
    # The network stays in training mode: dropout is on in the chains as in IGEBM's training graph.
    net.requires_grad_(False)
    with autocast(x.device, dtype):
        x_neg, sgld_grad_norm = sgld(lambda v: net(v).float(), x_neg, args.sgld_steps,
                                     args.sgld_step_size, args.sgld_noise, args.sgld_grad_clip)
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
        with autocast(device, dtype):
            x = sgld(lambda v: net(v).float(), torch.rand(8, 3, 32, 32, device=device), steps,
                     args.sgld_step_size, args.sgld_noise, args.sgld_grad_clip)[0]
        rows.append((f"{steps} steps from noise", x))
    net.train()
    common.save_rows(rows, run_dir / "samples" / f"epoch_{epoch:04d}.png",
                     title=f"epoch {epoch}: SGLD (each step one network evaluation)")


def share_buffer(buffer, world, rank, saved=None):
    """The replay buffer of the checkpoint: every rank's share (called on all ranks); or with
    `saved`, this rank's share of a saved one, for any number of processes: equal shares, the saved
    chains repeated if too few (an unequal split would break the collective that gathers them)."""
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
    # no flips: IGEBM's unconditional run does not augment its data
    loader = common.DeviceLoader(train_images, args.batch_size // world, device, args.seed, rank,
                                 world, flip=False)
    net, ema, optimizer, scaler = build(args, device)
    model = torch.compile(net) if args.compile else net
    model = DistributedDataParallel(model) if world > 1 else model
    torch.manual_seed(args.seed * 10**9 + rank * 10**6)  # each rank starts its own chains
    buffer = ReplayBuffer(args.buffer_size // world, (3, 32, 32), device, args.restart_rate)
    start, step, state = resume(args, net, ema, optimizer, scaler) if args.resume else \
        (0, 0, {"rollbacks": 0})
    if args.resume:
        share_buffer(buffer, world, rank, saved=state["buffer"])
    last_good = copy.deepcopy([net.state_dict(), optimizer.state_dict(), buffer.samples])
    run_dir, log = open_run(args, step) if rank == 0 else (None, None)
    if rank == 0:
        print(f"{run_dir}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_images)} images, {len(loader)} steps an epoch on {device} x {world}, "
              f"{dtype or torch.float32}")
    streak = worst = torch.zeros((), device=device)  # divergence signs in a row, on the device
    for epoch in range(start + 1, args.epochs + 1):
        torch.manual_seed(args.seed * 10**9 + rank * 10**6 + epoch)  # each rank's and epoch's noise
        tick = time.perf_counter()
        for i, x in enumerate(tqdm(loader.epoch(epoch), f"epoch {epoch}", len(loader), leave=False,
                                   disable=rank != 0)):  # x: (B, 3, 32, 32) in [0, 1]
            logs, bad = train_step(model, net, optimizer, scaler, buffer, x, args, dtype)
            update_ema(ema, net, args.ema, step)
            step += 1
            streak = (streak + 1) * bad
            worst = torch.maximum(worst, streak)
            if step % args.log_every == 0 or i == len(loader) - 1:  # the only host syncs
                if worst.item() >= args.max_bad_steps:  # the EBM's own remedy (JEM's, VAEBM's)
                    state["rollbacks"] = roll_back(last_good, net, optimizer, buffer, args, step,
                                                   state["rollbacks"], run_dir, log)
                    streak = worst = torch.zeros((), device=device)
                elif rank == 0:
                    log(step, epoch=epoch, **{k: v.item() for k, v in logs.items()},
                        lr=optimizer.param_groups[0]["lr"],
                        img_per_s=(i + 1) * args.batch_size / (time.perf_counter() - tick))
        state["buffer"] = share_buffer(buffer, world, rank)
        last_good = copy.deepcopy([net.state_dict(), optimizer.state_dict(), buffer.samples])
        if rank == 0:  # end of epoch: evaluate, preview, checkpoint
            seconds = time.perf_counter() - tick
            test = test_metrics(ema, test_images, args, device, dtype)
            write_previews(ema, buffer, run_dir, epoch, args, device, dtype)
            log(step, epoch=epoch, epoch_seconds=seconds, **test)
            save_checkpoint(run_dir, args=vars(args), net=net.state_dict(),
                            ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                            scaler=scaler.state_dict(), precision=str(dtype), epoch=epoch,
                            step=step, state=state)
            print(f"epoch {epoch}/{args.epochs}: gap E(x-) - E(x+) {logs['gap'].item():.4f}, "
                  f"test E {test['test_energy']:.4f} ({seconds:.0f} s)")
        if world > 1:  # (if rank 0 failed above, torchrun stops the other processes)
            dist.barrier()
    if rank == 0:
        log.finish({"epochs": args.epochs, "steps": step, **test, "rollbacks": state["rollbacks"],
                    "lr": optimizer.param_groups[0]["lr"],
                    "parameters": sum(p.numel() for p in net.parameters())})
    return run_dir


def roll_back(last_good, net, optimizer, buffer, args, step, rollbacks, run_dir, log):
    """Back to the weights, optimiser and replay buffer of the last checkpoint, at a lower lr."""
    if rollbacks >= args.max_rollbacks:
        raise UserError(f"the energy diverged (not finite, or |E| > {args.max_energy:g}) at step "
                        f"{step} after {rollbacks} rollback(s); the last good checkpoint is in "
                        f"{args.resume or run_dir}: resume it with a lower --lr or larger --alpha")
    weights, optimizer_state, buffer.samples = copy.deepcopy(last_good)
    net.load_state_dict(weights)
    optimizer.load_state_dict(optimizer_state)
    lr = optimizer.param_groups[0]["lr"] * args.lr_drop
    for group in optimizer.param_groups:
        group["lr"] = lr
    if log:
        print(f"divergence at step {step}: rolled back to the last checkpoint, lr lowered to "
              f"{lr:.3g} (rollback {rollbacks + 1} of {args.max_rollbacks} at most)",
              file=sys.stderr)
        log(step, rollback=rollbacks + 1, lr=lr)
    return rollbacks + 1


# ----------------------------------------------------------------------------------------------
# Commands: sample, evaluate, inpaint
# ----------------------------------------------------------------------------------------------

def load_trained(run, args, device):
    """The run's EMA network (dropout off), ready to sample, and its state (the replay buffer)."""
    net, _, _, _ = build(args, device)
    ckpt = load_checkpoint(run)
    load_weights(net, ckpt["ema"], run)
    return net.eval().requires_grad_(False), ckpt["state"]


def draw_samples(net, state, n, args, device, dtype):
    """n samples: SGLD chains of --steps steps from the saved replay buffer (where IGEBM's samples
    come from) or, with --chains noise, from uniform noise."""
    saved = state["buffer"]
    start = saved[torch.randperm(len(saved)).repeat(math.ceil(n / len(saved)))[:n]] \
        if args.chains == "buffer" else torch.rand(n, 3, 32, 32)
    out = []
    for x in start.split(args.batch_size):
        with autocast(device, dtype):
            out.append(sgld(lambda v: net(v).float(), x.to(device), args.steps, args.sgld_step_size,
                            args.sgld_noise, args.sgld_grad_clip)[0].cpu())
    return torch.cat(out)


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
    """FID / IS / KID of --n samples, and the mean energies of test images and of the samples, into
    RUN/eval.json (out-of-distribution detection: experiments/ebm_ood.py)."""
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


def inpaint(args, completions=3):
    """RUN/inpaint.png: the centre 16x16 of test images filled by SGLD on those pixels only."""
    device, _, _ = setup_device(args)
    net, _ = load_trained(args.inpaint, args, device)
    torch.manual_seed(args.seed)
    test = common.load_images(args.data, args.data_root, "test")[:8].to(device)
    test = (test.float() + 0.5) / 256  # the centres of the dequantization bins
    mask = torch.zeros(1, 1, 32, 32, device=device)
    mask[..., 8:24, 8:24] = 1  # 1: free pixel
    rows = [("masked", test * (1 - mask) + 0.5 * mask)]
    for c in range(completions):
        with autocast(device, amp_dtype(args, device)):
            start = torch.where(mask.bool(), torch.rand_like(test), test)
            x = sgld(lambda v: net(v).float(), start, args.steps, args.sgld_step_size,
                     args.sgld_noise, args.sgld_grad_clip, mask=mask)[0]
        rows.append((f"completion {c + 1}", x))
    common.save_rows(rows + [("original", test)], Path(args.inpaint) / "inpaint.png",
                     title=f"inpainting: SGLD on the masked pixels, {args.steps} steps")
    print(f"wrote {args.inpaint}/inpaint.png")


RECIPE = dict(epochs=200, lr=3e-4, ema=0.0, grad_clip=0.0)  # IGEBM: no EMA, IGEBM's clip (above)
COMMANDS = ("resume", "sample", "eval", "inpaint")  # the flags that name a run


def probability(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_model_args(p):
    add = p.add_argument
    add("--inpaint", metavar="RUN", help="fill the centre of test images by SGLD: RUN/inpaint.png")
    add("--steps", type=positive_int, help="SGLD steps of --sample, --eval, --inpaint (default: K)")
    add("--chains", default="buffer", choices=("buffer", "noise"),
        help="--sample / --eval chains start from the saved replay buffer (IGEBM) or from U(0, 1)")
    add("--width", type=positive_int, default=128, help="channels of the first stage (IGEBM: 128)")
    add("--dropout", type=probability, default=0.5, help="dropout in every block (IGEBM: 0.5)")
    add("--alpha", type=non_negative_float, default=1.0, help="weight of E(x+)^2 + E(x-)^2")
    add("--sgld-steps", type=positive_int, default=60, help="SGLD steps K per update (IGEBM: 60)")
    add("--sgld-step-size", type=positive_float, default=10.0, help="SGLD step lambda (IGEBM: 10)")
    add("--sgld-noise", type=non_negative_float, default=0.005, help="SGLD noise std (IGEBM)")
    add("--sgld-grad-clip", type=positive_float, default=0.01, help="clip grad_x E to +-this")
    add("--buffer-size", type=positive_int, default=10000, help="replay buffer, all processes")
    add("--restart-rate", type=probability, default=0.05, help="chains restarted from U(0, 1)")
    add("--max-energy", type=positive_float, default=1000.0, help="|E| beyond this: a divergence")
    add("--max-rollbacks", type=int, default=3, help="rollbacks to the last checkpoint, at most")
    add("--lr-drop", type=probability, default=0.5, help="multiply the lr by this at a rollback")


def check_model_args(args, error):
    args.steps = args.steps or args.sgld_steps
    if args.max_rollbacks < 0 or args.dropout == 1 or args.buffer_size < args.batch_size:
        error(f"--max-rollbacks must be >= 0 (got {args.max_rollbacks}), --dropout below 1 (got "
              f"{args.dropout}) and --buffer-size at least --batch-size (got {args.buffer_size})")


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
    add("--ema", type=float, help="decay of the weights' moving average that samples (0: none)")
    add("--grad-clip", type=non_negative_float, help="clip the gradient's norm to this (0: off)")
    add("--max-bad-steps", type=positive_int, default=50,
        help="divergence signs in a row that stop training (EBM: roll it back)")
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
            config = json.loads((Path(run) / "config.json").read_text())["args"]
        except FileNotFoundError:
            raise UserError(f"{run} is not a run folder (no config.json)") from None
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{run}/config.json is damaged (not this project's JSON)") from None
        p.set_defaults(**{k: v for k, v in config.items() if k not in COMMANDS})
        args = p.parse_args(argv)
    check_model_args(args, p.error)
    if not 0 <= args.ema < 1:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    if args.track and importlib.util.find_spec("wandb") is None:
        p.error("--track needs wandb: pip install wandb")
    return args


def setup_device(args):
    """(device, rank, world size). Under torchrun every process joins the group with its own GPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    found = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
             "cpu": True}
    name = next(n for n in found if found[n]) if args.device == "auto" else args.device
    if not found[name]:
        raise UserError(f"--device {name}: not available on this machine")
    device = torch.device(name, int(os.environ.get("LOCAL_RANK", 0)) if name == "cuda" else None)
    if name == "cuda":  # (TF32 stays off: what runs in float32 is meant to)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN may pick its fastest kernels
    if world > 1:
        cuda = name == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return device, rank, world


def amp_dtype(args, device):
    """The autocast precision (None: float32): bf16 on GPUs built for it (compute capability 8+),
    float16 on T4 and V100 (7.x: bf16 would be emulated), float32 on older GPUs and elsewhere."""
    capability = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
    return None if not args.amp or capability < 7 else torch.bfloat16 if capability >= 8 else \
        torch.float16


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device, dtype):
    """On in every precision: its step() skips an update whose gradients are not finite (without
    waiting for the host, given a fused optimiser). Under float16 it also scales the loss up so that
    small gradients do not round to zero; elsewhere its scale starts at 1 and never grows."""
    fp16 = dtype == torch.float16
    return torch.amp.GradScaler(device.type, init_scale=2.0**16 if fp16 else 1.0,
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
    """The run folder (new, or the one resumed) with config.json and its log, locked to one writer
    (RUN/lock names it). The system drops the lock when its process ends, however it ends: a killed
    run leaves nothing that blocks --resume. Rank 0 only."""
    run_dir = Path(args.resume) if args.resume else new_run_dir(args)
    if run_dir.resolve() in LOCKS:  # this process wrote the run before (a notebook, the tests)
        LOCKS.pop(run_dir.resolve()).close()
    lock = LOCKS[run_dir.resolve()] = open(run_dir / "lock", "a+")
    with contextlib.suppress(ImportError):  # fcntl: Unix and macOS (elsewhere, no lock)
        import fcntl

        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            raise UserError(f"{run_dir} is being written by process {lock.read().strip()}: one "
                            "writer at a time") from None
    lock.truncate(0), lock.write(f"{os.getpid()}\n"), lock.flush()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True,
                            capture_output=True).stdout.strip() if shutil.which("git") else ""
    config = {"args": vars(args), "torch": torch.__version__, "git_commit": commit or None,
              "command": sys.argv}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    (run_dir / "checkpoint.pt.tmp").unlink(missing_ok=True)  # what a crash during a save left
    return run_dir, Log(run_dir, args, step)


class Log:
    """metrics.jsonl (a JSON object per row), TensorBoard, and with --track Weights & Biases. On
    resume the rows after the checkpoint's step go (TensorBoard's too): they are trained again."""

    def __init__(self, run_dir, args, step):
        from torch.utils.tensorboard import SummaryWriter

        self.path, self.wandb = run_dir / "metrics.jsonl", None
        if step and self.path.exists():
            rows = [json.loads(r) for r in self.path.read_text().splitlines() if r.endswith("}")]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
        self.tensorboard = SummaryWriter(run_dir, purge_step=step + 1 if step else None)
        if args.track:
            import wandb

            self.wandb = wandb.init(project="cifar10-generative", name=run_dir.name,
                                    id=run_dir.name, resume="allow", config=vars(args))

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
    """checkpoint.pt, atomically: written to a temporary file, flushed to disk, then renamed over
    the old one, so that a crash during a save never destroys the last good checkpoint."""
    with open(run_dir / "checkpoint.pt.tmp", "wb") as f:
        torch.save({"model": MODEL, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(run_dir / "checkpoint.pt.tmp", run_dir / "checkpoint.pt")


def load_checkpoint(run):
    """RUN/checkpoint.pt, read with weights_only=True: pickled code is refused, not run."""
    path = Path(run) / "checkpoint.pt"
    try:
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
    return ckpt


def resume(args, net, ema, optimizer, scaler):
    """Load RUN/checkpoint.pt into the model; returns (epoch, step, the model's own state). No
    random state is saved: every epoch reseeds from (seed, rank, epoch), so resuming at an epoch
    boundary draws the same noise. A run may move between GPUs, precisions and the CPU."""
    ckpt = load_checkpoint(args.resume)
    if ckpt["epoch"] >= args.epochs:
        raise UserError(f"{args.resume} already has {ckpt['epoch']} epochs: pass --epochs N with "
                        f"N > {ckpt['epoch']}")
    load_weights(net, ckpt["net"], args.resume)
    load_weights(ema, ckpt["ema"], args.resume)
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


def load_weights(module, state_dict, run):
    try:
        module.load_state_dict(state_dict)
    except RuntimeError:
        raise UserError(f"{run} holds a network of another width or architecture (its config.json "
                        "says which)") from None


def main(argv=None):
    args = parse_args(argv)
    for command, run in (("sample", sample), ("eval", evaluate), ("inpaint", inpaint)):
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
