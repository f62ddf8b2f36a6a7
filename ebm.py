"""An energy-based model (EBM) of CIFAR-10, trained by contrastive divergence with SGLD and a replay buffer.

    python ebm.py                                   # train with IGEBM's settings (width 128, K = 60)
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

    L = E(x+) - E(x-) + alpha * (E(x+)^2 + E(x-)^2),   alpha = 1;   Adam(lr 1e-4, betas (0, 0.999)).

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
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm
from tqdm import tqdm

import common
from common import UserError, non_negative_float, positive_float, positive_int


def probability(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser():
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--epochs", type=positive_int, default=100, help="passes over the training images")
    a("--batch-size", type=positive_int, default=128, help="positives per step, summed over all processes")
    a("--lr", type=positive_float, default=1e-4, help="Adam learning rate (IGEBM: 1e-4)")
    a("--seed", type=int, default=1, help="random seed")
    a("--device", default="auto", choices=("auto", "cuda", "cpu", "mps"), help="where to train")
    a("--data", default="cifar10", help="'cifar10' or a folder of images")
    a("--data-root", default="data", help="where CIFAR-10 and decoded-image caches live")
    a("--run-dir", default="runs", help="parent folder of run folders")
    a("--name", default="default", help="experiment name, part of the run folder's name")
    a("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA (ignored elsewhere)")
    a("--compile", action="store_true", help="torch.compile the energy network")
    a("--track", action="store_true", help="also log to Weights & Biases")
    a("--limit-train", type=positive_int, help="use only the first N training images")
    a("--log-every", type=positive_int, default=10, help="log (and check for divergence) every K steps")
    a("--width", type=positive_int, default=128, help="channels of the first ResNet stage (IGEBM: 128)")
    # the EBM itself: loss, sampler, replay buffer, stability
    a("--alpha", type=non_negative_float, default=1.0, help="weight of alpha (E+^2 + E-^2) (IGEBM: 1)")
    a("--sgld-steps", type=positive_int, default=60, help="SGLD steps K per training step (IGEBM: 60)")
    a("--sgld-step-size", type=positive_float, default=10.0, help="SGLD step size lambda (IGEBM: 10)")
    a("--sgld-noise", type=non_negative_float, default=0.005, help="SGLD noise standard deviation (IGEBM: 0.005)")
    a("--sgld-grad-clip", type=positive_float, default=0.01, help="clip grad_x E to +-this in SGLD (IGEBM: 0.01)")
    a("--buffer-size", type=positive_int, default=10000, help="replay buffer size, per process (IGEBM: 10,000)")
    a("--restart-rate", type=probability, default=0.05, help="fraction of chains restarted from U(0,1) (IGEBM: 0.05)")
    a("--clip-grad", type=positive_float, default=0.1, help="max L2 norm of the parameter gradient")
    a("--max-energy", type=positive_float, default=1000.0, help="|E| beyond this counts as a divergence")
    a("--max-rollbacks", type=int, default=3, help="stop after this many rollbacks to the last good checkpoint")
    a("--lr-drop", type=probability, default=0.5, help="multiply the learning rate by this at each rollback")
    # commands
    a("--resume", metavar="RUN", help="continue (or extend, with a larger --epochs) the run in this folder")
    a("--sample", metavar="RUN", help="write RUN/samples.png and RUN/samples.npz (see --n, --steps, --chains)")
    a("--eval", metavar="RUN", help="FID / IS / KID, energy statistics and OOD AUROCs into RUN/eval.json")
    a("--inpaint", metavar="RUN", help="fill the centre of test images by SGLD: RUN/inpaint.png")
    a("--toy", nargs="?", const="8gaussians", choices=("8gaussians", "rings"),
      help="train a 2-D MLP energy on the CPU in under a minute (default data: 8gaussians)")
    a("--bench", action="store_true", help="time training steps and sampling; write bench.json")
    a("--n", type=positive_int, default=64, help="images for --sample / --eval / --inpaint")
    a("--steps", type=positive_int, help="SGLD steps for --sample / --eval / --inpaint (default: --sgld-steps)")
    a("--chains", default="buffer", choices=("buffer", "noise"),
      help="start --sample/--eval chains from the saved replay buffer (as IGEBM's samples) or from U(0,1)")
    a("--ood", choices=("svhn",), help="--eval: also score SVHN's test set (downloaded by torchvision)")
    a("--fid-extractor", default="inception-v3-compat", choices=("inception-v3-compat", "tiny-random"),
      help="feature extractor for FID / IS / KID (tiny-random: offline, for tests only)")
    a("--fid-weights", metavar="FILE", help="a downloaded Inception weights file for FID / IS / KID")
    return p


# ----------------------------------------------------------------------------------------------
# The energy network
# ----------------------------------------------------------------------------------------------
# SGLD moves images along -grad_x E, so the network's *input gradient* is what generates images.
# ReLU makes E piecewise linear in x: its gradient is piecewise constant and jumps between regions,
# and dead units pass no gradient at all. SiLU (Swish) is smooth, so grad_x E varies smoothly and
# SGLD follows the landscape. No BatchNorm: an image's energy must not depend on the other images
# in its batch (positives and negatives would get different statistics, a give-away).
# Spectral normalisation bounds each layer's Lipschitz constant, so the energy cannot become
# arbitrarily steep: the main stabiliser of IGEBM's training.

class ResBlock(nn.Module):
    """out = skip(x) + conv(silu(conv(silu(x)))), spectral-normalised; then optionally 2x average-pooled."""

    def __init__(self, c_in, c_out, down):
        super().__init__()
        self.conv1 = spectral_norm(nn.Conv2d(c_in, c_out, 3, padding=1))
        self.conv2 = spectral_norm(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = spectral_norm(nn.Conv2d(c_in, c_out, 1)) if c_in != c_out else nn.Identity()
        self.down = down

    def forward(self, x):
        out = self.skip(x) + self.conv2(F.silu(self.conv1(F.silu(x))))
        return F.avg_pool2d(out, 2) if self.down else out


class EnergyNet(nn.Module):
    """IGEBM's CIFAR-10 ResNet: (B, 3, 32, 32) in [0, 1] -> energies (B,). Six blocks, 32 -> 16 -> 8 -> 4."""

    def __init__(self, width=128):
        super().__init__()
        w = width
        self.stem = spectral_norm(nn.Conv2d(3, w, 3, padding=1))
        self.blocks = nn.Sequential(ResBlock(w, w, True), ResBlock(w, w, False), ResBlock(w, 2 * w, True),
                                    ResBlock(2 * w, 2 * w, False), ResBlock(2 * w, 2 * w, True),
                                    ResBlock(2 * w, 2 * w, False))
        self.head = spectral_norm(nn.Linear(2 * w, 1))

    def forward(self, x):
        h = F.silu(self.blocks(self.stem(2 * x - 1)))  # (B, 2w, 4, 4)
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
    return energy_pos.mean() - energy_neg.mean() + alpha * (energy_pos**2 + energy_neg**2).mean()


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

def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def autocast(args, device):
    return torch.autocast(device.type, torch.bfloat16, enabled=bool(args.amp) and device.type == "cuda")


def train_step(model, energy, net, optimizer, buffer, x, args, device):
    """One contrastive-divergence update. Returns device tensors (no host sync)."""
    x_pos = (x * 255 + torch.rand_like(x)) / 256  # uniform dequantization: a density over [0, 1], not 256 spikes
    x_neg, idx = buffer.sample(len(x_pos))
    # eval: spectral norm's power iteration runs only in the update below, not 60 times per step;
    # no grad for the weights: SGLD needs grad_x E only (a compiled backward would compute both)
    net.eval().requires_grad_(False)
    with autocast(args, device):
        x_neg, grad_norm, _ = sgld(lambda v: energy(v).float(), x_neg, args.sgld_steps, args.sgld_step_size,
                                   args.sgld_noise, args.sgld_grad_clip)
    net.train().requires_grad_(True)
    buffer.push(x_neg, idx)
    with autocast(args, device):
        energies = model(torch.cat([x_pos, x_neg])).float()  # one forward for both: one DDP all-reduce
    e_pos, e_neg = energies.chunk(2)
    loss = contrastive_divergence_loss(e_pos, e_neg, args.alpha)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip_grad)
    optimizer.step()
    bad = ~torch.isfinite(energies).all() | (energies.abs().max() > args.max_energy)
    return torch.stack([loss.detach(), e_pos.mean().detach(), e_neg.mean().detach(), grad_norm]), bad


def save_checkpoint(run_dir, net, optimizer, buffer, args, epoch, step, rollbacks):
    common.atomic_save({"model": "ebm", "args": vars(args), "net": net.state_dict(), "optimizer":
                        optimizer.state_dict(), "buffer": buffer.samples.cpu(), "epoch": epoch, "step": step,
                        "rollbacks": rollbacks, "rng": common.rng_state()}, Path(run_dir) / "checkpoint.pt")


def restore(ckpt, net, optimizer, buffer, path, seed, rank):
    """Load weights, optimiser, replay buffer and RNG from a checkpoint; returns (epoch, step, rollbacks)."""
    common.load_weights(net, ckpt["net"], path)
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["buffer"].shape[1:] != buffer.samples.shape[1:]:
        raise UserError(f"{path}: its replay buffer holds {tuple(ckpt['buffer'].shape[1:])} samples")
    buffer.samples = ckpt["buffer"].to(buffer.samples.device)
    common.set_rng_state(ckpt["rng"])
    if rank > 0:  # the checkpoint holds rank 0's buffer and RNG; other ranks must draw other chains
        torch.manual_seed(seed + 1000 * rank + ckpt["step"])
    return ckpt["epoch"], ckpt["step"], ckpt.get("rollbacks", 0)


@torch.no_grad()
def previews(net, energy, buffer, args, device, run_dir, epoch):
    """Per epoch: fresh chains from fixed noise (samples/epoch_NNNN.png), the buffer, one figure of chains."""
    net.eval()
    g = torch.Generator(device=device).manual_seed(args.seed)
    x0 = torch.rand(64, 3, 32, 32, generator=g, device=device)
    every = max(1, args.sgld_steps // 10)
    x, _, chain = sgld(energy, x0, args.sgld_steps, args.sgld_step_size, args.sgld_noise, args.sgld_grad_clip,
                       generator=g, every=every)
    common.save_grid(x, run_dir / "samples" / f"epoch_{epoch:04d}.png")
    common.save_grid(buffer.samples[:64], run_dir / "samples" / f"buffer_{epoch:04d}.png")
    rows = [(f"chain {i + 1}", torch.stack([state[i] for state in chain])) for i in range(4)]
    common.save_rows(rows, run_dir / "samples" / f"chain_{epoch:04d}.png",
                     title=f"SGLD from U(0,1) noise, epoch {epoch}: steps 0, {every}, ..., {args.sgld_steps}")
    net.train()


def train(args, device, rank, world):
    common.seed_everything(args.seed + rank)  # ranks draw different chains; DDP copies rank 0's weights
    images = common.load_images(args.data, args.data_root, "train")[: args.limit_train]
    ckpt = common.load_checkpoint(args.resume, "ebm") if args.resume else None
    net = EnergyNet(args.width).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.0, 0.999))  # beta1 = 0 (IGEBM)
    buffer = ReplayBuffer(args.buffer_size, (3, 32, 32), device, args.restart_rate)
    epoch, step, rollbacks = restore(ckpt, net, optimizer, buffer, args.resume, args.seed, rank) if ckpt else (0, 0, 0)
    if ckpt and epoch >= args.epochs:
        raise UserError(f"{args.resume} already has {epoch} epochs: pass --epochs N with N > {epoch}")
    if ckpt and args.lr != ckpt["args"]["lr"]:  # a new --lr on resume wins over the optimizer state's
        for group in optimizer.param_groups:  # (without one, a lr lowered by a rollback is kept)
            group["lr"] = args.lr
    energy = torch.compile(net) if args.compile else net  # the sampler's view of the network (no DDP hooks)
    model = nn.parallel.DistributedDataParallel(energy) if world > 1 else energy
    loader = common.DeviceLoader(images, args.batch_size // world, device, args.seed, rank, world)

    run_dir = [common.make_run_dir("ebm", args) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(run_dir)
    run_dir = Path(run_dir[0])
    log = None
    if rank == 0:
        common.save_config(run_dir, args)
        log = common.RunLog(run_dir, args, args.track)
        print(f"run folder {run_dir}  |  {sum(p.numel() for p in net.parameters()):,} parameters  |  "
              f"{len(images)} images, {len(loader)} steps per epoch on {world} process(es), {device}")
        if ckpt is None:  # the first "last good checkpoint", so that even epoch 1 can roll back
            save_checkpoint(run_dir, net, optimizer, buffer, args, epoch, step, rollbacks)
    start, means = time.perf_counter(), {}

    while epoch < args.epochs:
        totals, bad = torch.zeros(4, device=device), torch.zeros((), dtype=torch.bool, device=device)
        bar = tqdm(loader.epoch(epoch), total=len(loader), disable=rank != 0, leave=False, desc=f"epoch {epoch + 1}")
        tick, tick_step, diverged = time.perf_counter(), step, False
        epoch_start = tick
        for i, x in enumerate(bar):
            stats, step_bad = train_step(model, energy, net, optimizer, buffer, x, args, device)
            totals, bad, step = totals + stats, bad | step_bad, step + 1
            if step % args.log_every == 0 or i == len(loader) - 1:
                if world > 1:  # every rank must agree to roll back together
                    bad = bad.int()
                    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
                diverged = bool(bad)
                if diverged:
                    break
                loss, e_pos, e_neg, grad_norm = stats.tolist()
                img_s = (step - tick_step) * args.batch_size / (time.perf_counter() - tick)
                tick, tick_step = time.perf_counter(), step
                bar.set_postfix(loss=f"{loss:.3f}", gap=f"{e_neg - e_pos:.3f}", img_s=f"{img_s:.0f}")
                if log:
                    log.log(step, epoch=epoch + 1, loss=loss, energy_pos=e_pos, energy_neg=e_neg, gap=e_neg - e_pos,
                            sgld_grad_norm=grad_norm, lr=optimizer.param_groups[0]["lr"], img_per_s=img_s)
        bar.close()
        if diverged:  # roll back to the last good checkpoint with a lower learning rate (JEM's and VAEBM's fix)
            path = run_dir / "checkpoint.pt"
            good = common.load_checkpoint(path, "ebm")
            lr = optimizer.param_groups[0]["lr"] * args.lr_drop
            if rollbacks + 1 > args.max_rollbacks:
                raise UserError(f"the energy diverged (non-finite or |E| > {args.max_energy:g}) at step {step} after "
                                f"{rollbacks} rollback(s); the last good checkpoint is {path} (epoch {good['epoch']}): "
                                "try --resume with a lower --lr or a larger --alpha")
            epoch, step, _ = restore(good, net, optimizer, buffer, path, args.seed, rank)
            rollbacks += 1
            for group in optimizer.param_groups:
                group["lr"] = lr
            if log:
                print(f"divergence: rolled back to {path} (epoch {epoch}, step {step}), lr lowered to {lr:.3g} "
                      f"(rollback {rollbacks} of at most {args.max_rollbacks})", file=sys.stderr)
                log.log(step, epoch=epoch, rollback=rollbacks, lr=lr)
            continue
        epoch += 1
        means = dict(zip(("loss", "energy_pos", "energy_neg", "sgld_grad_norm"), (totals / len(loader)).tolist()))
        means["gap"] = means["energy_neg"] - means["energy_pos"]  # E(x-) - E(x+): positive once data is likelier
        if rank == 0:
            log.log(step, epoch=epoch, epoch_seconds=time.perf_counter() - epoch_start,
                    lr=optimizer.param_groups[0]["lr"], **means)
            previews(net, energy, buffer, args, device, run_dir, epoch)  # before the save: it draws noise
            save_checkpoint(run_dir, net, optimizer, buffer, args, epoch, step, rollbacks)
            print(f"epoch {epoch}/{args.epochs}: loss {means['loss']:.4f}  E+ {means['energy_pos']:.4f}  "
                  f"E- {means['energy_neg']:.4f}  gap {means['gap']:.4f}  SGLD |grad| {means['sgld_grad_norm']:.4f}  "
                  f"{time.perf_counter() - start:.0f} s")
        if world > 1:
            dist.barrier()
    if rank == 0:
        summary = {"epochs": epoch, "steps": step, "parameters": sum(p.numel() for p in net.parameters()),
                   "rollbacks": rollbacks, "lr": optimizer.param_groups[0]["lr"],
                   "wall_s": time.perf_counter() - start, **{f"last_epoch_{k}": v for k, v in means.items()}}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        common.plot_metrics(run_dir)
        log.close()
    return run_dir


# ----------------------------------------------------------------------------------------------
# Using a trained model: sampling, evaluation with OOD detection, inpainting
# ----------------------------------------------------------------------------------------------

def generate(net, ckpt, args, device, n):
    """n samples: SGLD chains of --steps steps from the saved buffer (IGEBM's samples) or from noise."""
    g = torch.Generator().manual_seed(args.seed)
    buffer = ckpt["buffer"]  # without replacement while the buffer lasts: no duplicate samples in the FID
    start = buffer[torch.randperm(len(buffer), generator=g).repeat(math.ceil(n / len(buffer)))[:n]] \
        if args.chains == "buffer" else torch.rand(n, 3, 32, 32, generator=g)
    torch.manual_seed(args.seed)
    out = []
    for x in start.split(args.batch_size):
        with autocast(args, device):
            x, _, _ = sgld(lambda v: net(v).float(), x.to(device), args.steps, args.sgld_step_size, args.sgld_noise,
                           args.sgld_grad_clip)
        out.append(x.cpu())
    return torch.cat(out)


@torch.no_grad()
def energies_of(net, x, args, device):
    with autocast(args, device):
        return torch.cat([net(b.to(device)).float().cpu() for b in x.split(args.batch_size)])


def test_subset(args, n):
    """The first n test images (a fair sample: common.py stores every split in a fixed shuffled order),
    as float (n, 3, 32, 32) in [0, 255]."""
    return common.load_images(args.data, args.data_root, "test")[:n].float()


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
    """Out-of-distribution inputs as in IGEBM and JEM, each (N, 3, 32, 32) in [0, 1]."""
    n = len(test)
    return {"uniform noise": torch.rand(n, 3, 32, 32, generator=generator),
            "constant colour": torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, 32, 32),
            "heavy noise (sigma 0.3)": (test + 0.3 * torch.randn(test.shape, generator=generator)).clamp(0, 1),
            "shuffled pixels": torch.stack([x.flatten(1)[:, torch.randperm(1024, generator=generator)].view(3, 32, 32)
                                            for x in test])}


def evaluate(net, ckpt, args, device, run_dir):
    svhn = load_svhn(args.data_root, args.n) if args.ood == "svhn" else None  # fail before the slow part
    test = (test_subset(args, args.n) + 0.5) / 256  # the centres of the dequantization bins
    start = time.perf_counter()
    samples = generate(net, ckpt, args, device, args.n)
    sampling_seconds_per_1000 = 1000 * (time.perf_counter() - start) / args.n
    scores = common.generative_metrics(samples, args.data, args.data_root, args.fid_extractor, args.fid_weights,
                                       device)
    sets = {"test images": test, "samples": samples, **ood_sets(test, torch.Generator().manual_seed(args.seed))}
    if svhn is not None:
        sets["svhn"] = svhn
    energy = {name: energies_of(net, x, args, device) for name, x in sets.items()}
    aurocs = {name: auroc(-energy["test images"], -e) for name, e in energy.items()
              if name not in ("test images", "samples")}  # score = -E(x): high means in-distribution
    result = {**scores, "steps": args.steps, "chains": args.chains, "n_test": len(test),
              "sampling_seconds_per_1000": sampling_seconds_per_1000, "nfe_per_sample": args.steps,
              "energy": {k: {"mean": e.mean().item(), "std": e.std().item()} for k, e in energy.items()},
              "ood_auroc": aurocs}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    plt = pyplot()
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


def inpaint(net, args, device, run_dir, completions=3):
    """Fill the centre 16x16 of test images by SGLD on the masked pixels only; the rest stays the data."""
    test = ((test_subset(args, min(args.n, 10)) + 0.5) / 256).to(device)  # bin centres, as in training
    mask = torch.zeros(1, 1, 32, 32, device=device)
    mask[..., 8:24, 8:24] = 1  # 1 = unknown pixel
    torch.manual_seed(args.seed)
    rows = [("masked", test * (1 - mask) + 0.5 * mask)]
    for c in range(completions):
        start = torch.where(mask.bool(), torch.rand_like(test), test)
        with autocast(args, device):
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


def train_toy(name, iterations=None, seed=1):
    torch.manual_seed(seed)
    g, box = torch.Generator().manual_seed(seed), TOY["box"]
    net = toy_energy_net(TOY["hidden"])
    optimizer = torch.optim.Adam(net.parameters(), lr=TOY["lr"], betas=(0.0, 0.999))
    buffer = ReplayBuffer(10000, (2,), "cpu", 0.05, low=-box, high=box)
    for _ in range(iterations or TOY["iterations"]):
        x_neg, idx = buffer.sample(TOY["batch"])
        x_neg, _, _ = sgld(net, x_neg, TOY["steps"], TOY["eps"] / 2, math.sqrt(TOY["eps"]), bounds=(-box, box))
        buffer.push(x_neg, idx)
        e_pos, e_neg = net(torch.cat([common.toy_data(name, TOY["batch"], g), x_neg])).chunk(2)
        loss = contrastive_divergence_loss(e_pos, e_neg, TOY["alpha"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net, buffer


def toy(args):
    start = time.perf_counter()
    net, buffer = train_toy(args.toy, seed=args.seed)
    wall = time.perf_counter() - start
    run_dir = Path(args.run_dir) / f"ebm__toy-{args.toy}__{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=False)
    box, n = TOY["box"], 200
    axis = torch.linspace(-box, box, n)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        energy = net(grid).view(n, n)
        data = common.toy_data(args.toy, 2000, torch.Generator().manual_seed(0))
        e_on_data = net(data)
        e_data, e_noise = e_on_data.mean().item(), net(buffer.noise(2000, (2,), "cpu")).mean().item()
    density = torch.exp(-(energy - energy.min()))
    plt = pyplot()
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


def bench(args, device, warmup=1, timed=3):
    """Training steps (after warm-up) and full-length sampling chains, timed; written to bench.json."""
    torch.manual_seed(args.seed)
    net = EnergyNet(args.width).to(device)
    energy = torch.compile(net) if args.compile else net
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.0, 0.999))
    buffer = ReplayBuffer(max(args.batch_size, 256), (3, 32, 32), device, args.restart_rate)
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup + timed):
        if i == warmup:
            sync()
            start = time.perf_counter()
        train_step(energy, energy, net, optimizer, buffer, x, args, device)
    sync()
    step_s = (time.perf_counter() - start) / timed
    start = time.perf_counter()
    with autocast(args, device):
        sgld(lambda v: energy(v).float(), x, args.sgld_steps, args.sgld_step_size, args.sgld_noise, args.sgld_grad_clip)
    sync()
    sample_s = time.perf_counter() - start
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
              "width": args.width, "batch_size": args.batch_size, "sgld_steps": args.sgld_steps,
              "parameters": sum(p.numel() for p in net.parameters()),
              "train_step_s": step_s, "train_images_per_s": args.batch_size / step_s,
              "sample_images_per_s": args.batch_size / sample_s, "peak_memory_gib": peak / 2**30,
              "projected_hours_200_epochs": 200 * 50000 / (args.batch_size / step_s) / 3600,
              "amp": bool(args.amp) and cuda, "compile": args.compile}
    run_dir = Path(args.resume) if args.resume else Path(args.run_dir) / f"ebm__bench__{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {run_dir / 'bench.json'}")
    return result


def main(argv=None):
    args = common.parse_args(build_parser(), argv)
    args.steps = args.steps or args.sgld_steps
    if args.toy:
        return toy(args)
    if args.sgld_noise < 0 or args.alpha < 0 or args.max_rollbacks < 0:
        raise UserError("--sgld-noise, --alpha and --max-rollbacks must not be negative")
    device, rank, world = common.setup_device(args.device)
    if args.bench:
        return bench(args, device)
    run_dir = args.sample or args.eval or args.inpaint
    if run_dir:
        ckpt, net = common.load_checkpoint(run_dir, "ebm"), EnergyNet(args.width).to(device).eval()
        common.load_weights(net, ckpt["net"], run_dir)
        run_dir = Path(run_dir)
        if args.eval:
            return evaluate(net, ckpt, args, device, run_dir)
        if args.inpaint:
            return inpaint(net, args, device, run_dir)
        samples = generate(net, ckpt, args, device, args.n)
        common.save_grid(samples, run_dir / "samples.png")
        import numpy as np

        np.savez_compressed(run_dir / "samples.npz", samples=common.to_uint8(samples).permute(0, 2, 3, 1).numpy())
        print(f"wrote {len(samples)} samples ({args.chains} chains, {args.steps} SGLD steps) to "
              f"{run_dir / 'samples.png'} and samples.npz")
        return samples
    if args.batch_size < world:
        raise UserError(f"--batch-size {args.batch_size} is smaller than the {world} processes")
    return train(args, device, rank, world)


if __name__ == "__main__":
    common.run_main(main)
