"""Noise Conditional Score Network (NCSN) with annealed Langevin dynamics, on CIFAR-10.

    python ncsn.py --epochs 200                        # NCSNv2's recipe on one GPU
    python ncsn.py --preset ncsn2019 --epochs 200      # the 2019 paper's setting, to compare
    python ncsn.py --toy                               # the paper's 2-D experiment, < 1 min on a CPU
    python ncsn.py --sample runs/RUN --n 64            # grid + .npz + trajectory figure
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
"""

import argparse
import copy
import json
import math
import resource
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import common
from common import UserError, positive_float, positive_int

PRESETS = {  # the flags each paper fixes; anything given on the command line wins
    "ncsnv2": dict(sigma_max=50.0, sigma_min=0.01, num_scales=232, steps_per_level=5, step_eps=6.2e-6,
                   lr=1e-4, ema=0.999, denoise=True, score_param="divide"),
    "ncsn2019": dict(sigma_max=1.0, sigma_min=0.01, num_scales=10, steps_per_level=100, step_eps=2e-5,
                     lr=1e-3, ema=0.0, denoise=False, score_param="embed"),
}


def build_parser(preset="ncsnv2"):
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="ncsnv2", help="paper recipe: ncsnv2 (default) or ncsn2019")
    p.add_argument("--epochs", type=positive_int, default=200, help="passes over the training set")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per step, all GPUs together")
    p.add_argument("--lr", type=positive_float, help="Adam learning rate (NCSNv2: 1e-4; 1e-3 blows up with f/sigma)")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    p.add_argument("--device", choices=["auto", "cuda", "cpu", "mps"], default="auto", help="where to run")
    p.add_argument("--data", default="cifar10", help="'cifar10' or any folder of images")
    p.add_argument("--data-root", default="data", help="where CIFAR-10 and decoded-image caches live")
    p.add_argument("--run-dir", default="runs", help="parent folder of run folders")
    p.add_argument("--name", default="default", help="run name, part of the run folder's name")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the score network")
    p.add_argument("--track", action="store_true", help="also log to Weights & Biases (needs wandb)")
    p.add_argument("--limit-train", type=positive_int, help="use only the first N training images")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between logged (host-synced) losses")
    # what to do, if not training from scratch
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder (use --epochs to extend)")
    p.add_argument("--sample", metavar="RUN", help="draw --n samples from this run's EMA model")
    p.add_argument("--eval", metavar="RUN", help="FID / IS / KID on --n samples, and the test DSM loss")
    p.add_argument("--inpaint", metavar="RUN", help="fill in occluded test images (right half, centre square)")
    p.add_argument("--toy", action="store_true", help="the NCSN paper's 2-D mixture experiment (CPU, < 1 min)")
    p.add_argument("--bench", action="store_true", help="measure training and sampling speed; write bench.json")
    p.add_argument("--n", type=positive_int, default=64, help="number of samples for --sample / --eval / --inpaint")
    # the network
    p.add_argument("--width", type=positive_int, default=128, help="channels at 32x32 (128: 34.2M parameters)")
    p.add_argument("--channel-mult", default="1,2,2,2", help="channel multiplier per resolution 32,16,8,4")
    p.add_argument("--num-res-blocks", type=positive_int, default=2, help="residual blocks per resolution")
    p.add_argument("--score-param", choices=["divide", "embed"], help="s = f(x, sigma) / sigma, or s = f(x, sigma)")
    # noise levels, training and sampling (defaults come from --preset)
    p.add_argument("--sigma-max", type=positive_float, help="largest noise level sigma_1")
    p.add_argument("--sigma-min", type=positive_float, help="smallest noise level sigma_L")
    p.add_argument("--num-scales", type=positive_int, help="number of noise levels L")
    p.add_argument("--steps-per-level", type=positive_int, help="Langevin steps T at each level")
    p.add_argument("--step-eps", type=positive_float, help="eps in alpha_i = eps sigma_i^2 / sigma_L^2")
    p.add_argument("--denoise", action=argparse.BooleanOptionalAction, help="final Tweedie denoising step")
    p.add_argument("--ema", type=float, help="EMA decay of the weights (0: no EMA)")
    p.add_argument("--grad-clip", type=common.non_negative_float, default=1.0, help="clip the gradient norm (0: off)")
    p.add_argument("--max-bad-steps", type=positive_int, default=20, help="stop after this many non-finite steps")
    p.add_argument("--test-images", type=positive_int, default=1000, help="test images for the per-epoch DSM loss")
    p.add_argument("--sample-batch", type=positive_int, default=1000, help="images per sampler batch")
    p.add_argument("--preview-levels", type=positive_int, default=100,
                   help="per-epoch preview grids use this many levels, one step each (cheaper than the sampler)")
    p.add_argument("--fid-extractor", default="inception-v3-compat", choices=["inception-v3-compat", "tiny-random"],
                   help="torch-fidelity feature extractor; tiny-random is an offline test net (not comparable)")
    p.add_argument("--fid-weights", metavar="FILE", help="Inception weights file, for machines with no network")
    p.set_defaults(**PRESETS[preset])
    return p


# ----------------------------------------------------------------------------------------------
# Noise levels
# ----------------------------------------------------------------------------------------------

def geometric_sigmas(sigma_max, sigma_min, num_scales):
    """sigma_1 > ... > sigma_L with a constant ratio (NCSNv2 technique 2)."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_scales))


def noise_levels(args, levels=None):
    """The run's sigmas (or `levels` of them between the same end points, for cheaper previews)."""
    return geometric_sigmas(args.sigma_max, args.sigma_min, levels or args.num_scales)


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


class ScoreNet(nn.Module):
    """s(x, sigma) for images x (B, 3, 32, 32) and noise levels sigma (B,).

    A U-Net, not the papers' RefineNet: it sees the whole image at 4x4 yet keeps 32x32 detail through
    skip connections, it is the architecture later score models settled on (DDPM, NCSN++), and it
    is faster per parameter. With score_param='divide' the output is f(x, sigma) / sigma (NCSNv2
    technique 3): the true score of p_sigma has size about 1/sigma, so f only has to produce unit-size
    outputs at every level. A learned embedding of log sigma is added in every block on top.
    """

    def __init__(self, width=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, score_param="divide"):
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
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1))
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
        h = self.head((x - 0.5) / (sigma**2 + 0.25).sqrt())
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for block in self.middle:
            h = block(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        f = self.out(h)  # (B, 3, 32, 32)
        return f / sigma if self.divide else f


# ----------------------------------------------------------------------------------------------
# The loss and the sampler
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


def tweedie_denoise(score_net, x, sigma):
    """E[x_clean | x] = x + sigma^2 grad log p_sigma(x) (Tweedie's formula): the final denoising step."""
    return x + sigma**2 * score_net(x, sigma.expand(len(x))).float()


def annealed_langevin(score_net, x, sigmas, steps, eps, denoise=True, observed=None, mask=None, record=(),
                      generator=None):
    """Annealed Langevin dynamics (NCSN Alg. 1), and inpainting (Alg. 2) when observed/mask are given.

    The update x <- x + alpha s + sqrt(2 alpha) z follows the papers' code; Alg. 1 in the paper
    writes the same chain as x + alpha/2 s + sqrt(alpha) z, i.e. with a step twice as large.
    alpha_i = eps sigma_i^2 / sigma_L^2 scales the step with the level, so that the signal-to-noise
    ratio of each update is the same at every level. For inpainting, the observed pixels (mask True)
    are replaced at every step by the observation noised to the current level. Returns the samples
    and a snapshot after each level index in `record`.
    """
    snapshots = []
    for i, sigma in enumerate(sigmas):
        alpha = eps * (sigma / sigmas[-1]) ** 2
        sigma_batch = sigma.expand(len(x))
        if mask is not None:
            noisy_observed = observed + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        for _ in range(steps):
            z = torch.randn(x.shape, generator=generator, device=x.device)
            x = x + alpha * score_net(x, sigma_batch).float() + (2 * alpha).sqrt() * z
            if mask is not None:
                x = torch.where(mask, noisy_observed, x)
        if i in record:
            snapshots.append(x.clone())
    if denoise:
        x = tweedie_denoise(score_net, x, sigmas[-1])
    if mask is not None:
        x = torch.where(mask, observed, x)
    return x, snapshots


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


def toy_experiment(run_dir, n=1280, seed=0):
    """Plain vs annealed Langevin with the exact score, and annealed Langevin with a learned score."""
    g = torch.Generator().manual_seed(seed)
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

    matplotlib.use("Agg")
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
    return shares


# ----------------------------------------------------------------------------------------------
# Training, sampling, evaluation
# ----------------------------------------------------------------------------------------------

def build_net(args):
    mult = tuple(int(m) for m in str(args.channel_mult).split(","))
    return ScoreNet(args.width, mult, args.num_res_blocks, args.score_param)


def sampler_settings(args, device, preview=False):
    """The paper's sampler, or for per-epoch previews a cheaper one: fewer levels, one step each."""
    levels = min(args.preview_levels, args.num_scales) if preview else args.num_scales
    return dict(sigmas=noise_levels(args, levels).to(device),
                steps=1 if preview else args.steps_per_level, eps=args.step_eps, denoise=args.denoise)


def autocast(args, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")


@torch.inference_mode()
def sample(net, n, args, device, seed=0, record=(), preview=False):
    """n samples (float, unclamped) from x_0 ~ U[0, 1]^D, in batches of --sample-batch."""
    g = torch.Generator(device=device).manual_seed(seed)
    out, snaps = [], []
    for i in range(0, n, args.sample_batch):
        x0 = torch.rand(min(args.sample_batch, n - i), 3, 32, 32, generator=g, device=device)
        with autocast(args, device):
            x, s = annealed_langevin(net, x0, **sampler_settings(args, device, preview), record=record, generator=g)
        out.append(x)
        snaps = snaps or s
    return torch.cat(out), snaps


@torch.inference_mode()
def test_dsm_loss(net, test, args, device, buckets=4):
    """DSM loss on test images with fixed noise, per quarter of the noise levels (largest sigmas first)."""
    g = torch.Generator(device=device).manual_seed(1234)
    sigmas = noise_levels(args).to(device)
    edges = torch.linspace(0, len(sigmas), buckets + 1).long().tolist()
    totals = torch.zeros(buckets, device=device)
    x = test.to(device).float() / 255
    for i in range(0, len(x), 500):
        batch = x[i:i + 500]
        for b in range(buckets):
            lo, hi = edges[b], max(edges[b + 1], edges[b] + 1)
            levels = torch.randint(lo, hi, (len(batch),), generator=g, device=device)
            noise = torch.randn(batch.shape, generator=g, device=device)
            with autocast(args, device):
                totals[b] += dsm_loss(net, batch, sigmas, levels, noise).sum()
    per_bucket = (totals / len(x)).tolist()
    return {"test_dsm": sum(per_bucket) / buckets, **{f"test_dsm_q{b + 1}": v for b, v in enumerate(per_bucket)}}


@torch.no_grad()  # the average is not part of any graph (under autograd it would grow one per step)
def update_ema(ema, net, decay):
    """ema <- decay ema + (1 - decay) net, tensor by tensor (NCSNv2 technique 5); decay 0 copies net."""
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)


def save_checkpoint(run_dir, net, ema, opt, epoch, step, args):
    common.atomic_save({"model": "ncsn", "args": vars(args), "net": net.state_dict(), "ema": ema.state_dict(),
                        "optimizer": opt.state_dict(), "epoch": epoch, "step": step, "rng": common.rng_state()},
                       Path(run_dir) / "checkpoint.pt")


def train(args):
    device, rank, world = common.setup_device(args.device)
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    common.seed_everything(args.seed + rank)  # the same init everywhere (DDP broadcasts it), different noise
    train_images = common.load_images(args.data, args.data_root, "train")[: args.limit_train]
    test_images = common.load_images(args.data, args.data_root, "test")[: args.test_images]
    net = build_net(args).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, fused=True)  # fused: one kernel, and see found_inf below
    start_epoch, step = 0, 0
    if args.resume:
        ckpt = common.load_checkpoint(args.resume, "ncsn")
        common.load_weights(net, ckpt["net"], args.resume)
        common.load_weights(ema, ckpt["ema"], args.resume)
        opt.load_state_dict(ckpt["optimizer"])
        for group in opt.param_groups:  # the optimizer state carries the old lr: --lr on resume must win
            group["lr"] = args.lr
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        if start_epoch >= args.epochs:
            raise UserError(f"{args.resume} already has {start_epoch} epochs: pass --epochs N with N > {start_epoch}")
    run_dir = common.make_run_dir("ncsn", args) if rank == 0 else None
    model = DistributedDataParallel(net) if world > 1 else net
    model = torch.compile(model) if args.compile else model
    loader = common.DeviceLoader(train_images, args.batch_size // world, device, args.seed, rank, world)
    sigmas = noise_levels(args).to(device)
    if rank == 0:
        common.save_config(run_dir, args)
        log = common.RunLog(run_dir, args, args.track)
        print(f"run folder: {run_dir}\n{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
              f"{len(train_images)} training images, {len(loader)} steps per epoch on {device} x {world}")
        print(f"NCSNv2 technique 1: the largest distance between {min(2000, len(train_images))} training images "
              f"is {common.largest_distance(train_images, 2000):.1f}; sigma_1 = {args.sigma_max:g}")
    if rank == 0 and start_epoch == 0:  # the baseline: a zero score (the initial network) gives D/2
        log.log(0, epoch=0, **test_dsm_loss(ema, test_images, args, device))
    if args.resume:
        common.set_rng_state(ckpt["rng"])  # rank 0's generators...
        if rank > 0:  # ...so the other ranks need noise of their own again
            torch.manual_seed(args.seed + rank + 1000 * start_epoch)
    preview_noise_seed = 0
    bad_streak = torch.zeros((), device=device)  # consecutive non-finite steps, counted on the device
    worst_streak = torch.zeros((), device=device)
    for epoch in range(start_epoch, args.epochs):
        net.train()
        tick, seen = time.perf_counter(), 0
        bar = tqdm(loader.epoch(epoch), total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=rank != 0, leave=False)
        for x in bar:  # x: (B, 3, 32, 32) in [0, 1], randomly flipped
            with autocast(args, device):
                loss = dsm_loss(model, x, sigmas).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip or float("inf"))
            # A non-finite loss gives non-finite gradients: skip that step. Asking the host would stall
            # the GPU every step, so the decision stays on the device: the fused Adam kernel leaves
            # weights, moments and step count alone where found_inf is 1 (torch.amp.GradScaler's hook).
            finite = torch.isfinite(grad_norm)
            opt.found_inf = (~finite).float()
            opt.step()
            update_ema(ema, net, args.ema)
            bad_streak = (bad_streak + 1) * (~finite)
            worst_streak = torch.maximum(worst_streak, bad_streak)
            step, seen = step + 1, seen + len(x) * world
            if step % args.log_every == 0 or seen >= len(loader) * loader.batch_size * world:
                if worst_streak.item() >= args.max_bad_steps:  # the only host syncs: every --log-every steps
                    last = f"{run_dir}/checkpoint.pt" if rank == 0 and epoch > 0 else "none yet"
                    raise UserError(f"training diverged: {args.max_bad_steps} non-finite steps in a row at step "
                                    f"{step}; last good checkpoint: {last} (resume it with a lower --lr)")
                rate = seen / (time.perf_counter() - tick)
                if rank == 0:
                    bar.set_postfix(loss=f"{loss.item():.2f}", img_s=f"{rate:.0f}")
                    log.log(step, epoch=epoch + 1, loss=loss.item(), grad_norm=grad_norm.item(), img_per_s=rate,
                            lr=args.lr)
        if rank == 0:
            seconds = time.perf_counter() - tick
            test = test_dsm_loss(ema, test_images, args, device)
            preview, _ = sample(ema, 64, args, device, seed=preview_noise_seed, preview=True)
            common.save_grid(preview, Path(run_dir) / "samples" / f"epoch_{epoch + 1:04d}.png", nrow=8)
            log.log(step, epoch=epoch + 1, epoch_seconds=seconds, **test)
            save_checkpoint(run_dir, net, ema, opt, epoch + 1, step, args)
            print(f"epoch {epoch + 1}/{args.epochs}  step {step}  train loss {loss.item():.3f}  test DSM "
                  f"{test['test_dsm']:.3f}  ({seconds:.0f} s, {seen / seconds:.0f} img/s)")
        if world > 1:
            torch.distributed.barrier()
    if rank == 0:
        summary = {"epochs": args.epochs, "steps": step, **test, "parameters": sum(p.numel() for p in net.parameters())}
        (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        common.plot_metrics(run_dir)
        log.close()
    return run_dir


def load_run(run_dir, args, device):
    ckpt = common.load_checkpoint(run_dir, "ncsn")
    net = build_net(args).to(device)
    common.load_weights(net, ckpt["ema"], run_dir)  # every sample and evaluation uses the EMA weights
    return net.eval().requires_grad_(False)


def run_sample(args):
    device, _, _ = common.setup_device(args.device)
    net = load_run(args.sample, args, device)
    levels = args.num_scales
    record = sorted({round(i * (levels - 1) / 7) for i in range(8)})  # about eight levels along the chain
    x, snaps = sample(net, args.n, args, device, seed=args.seed, record=record)
    out = Path(args.sample)
    common.save_grid(x, out / "samples.png")
    import numpy as np

    np.savez_compressed(out / "samples.npz", samples=common.to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())
    sigmas = noise_levels(args)
    rows = [(f"sigma={sigmas[i]:.3g}", s[:8]) for i, s in zip(record, snaps)] + [("final", x[:8])]
    common.save_rows(rows, out / "trajectory.png", title="annealed Langevin: the same chains, largest noise first")
    print(f"wrote {args.n} samples to {out}/samples.png, samples.npz and trajectory.png")


def run_inpaint(args):
    device, _, _ = common.setup_device(args.device)
    net = load_run(args.inpaint, args, device)
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
            with torch.inference_mode(), autocast(args, device):
                x, _ = annealed_langevin(net, torch.rand(y.shape, generator=g, device=device), observed=y,
                                         mask=mask, generator=g, **sampler_settings(args, device))
            rows.append((f"completion {k + 1}", x))
        rows.append(("original", y))
        common.save_rows(rows, Path(args.inpaint) / f"inpaint_{name}.png", title=f"inpainting: {name}")
    print(f"wrote {args.inpaint}/inpaint_right_half.png and inpaint_centre.png")


def run_eval(args):
    device, _, _ = common.setup_device(args.device)
    net = load_run(args.eval, args, device)
    start = time.perf_counter()
    x, _ = sample(net, args.n, args, device, seed=args.seed)
    seconds = time.perf_counter() - start
    scores = common.generative_metrics(x, args.data, args.data_root, args.fid_extractor, args.fid_weights, device)
    test = test_dsm_loss(net, common.load_images(args.data, args.data_root, "test"), args, device)
    nfe = args.num_scales * args.steps_per_level + int(args.denoise)
    result = {**scores, **test, "sampling_seconds_per_1000": 1000 * seconds / args.n, "nfe_per_sample": nfe}
    (Path(args.eval) / "eval.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def run_bench(args, steps=5):
    device, _, _ = common.setup_device(args.device)
    torch.manual_seed(args.seed)
    net = build_net(args).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    model = torch.compile(net) if args.compile else net
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sigmas = noise_levels(args).to(device)
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def timed(fn, repeats):
        fn()  # warm-up (and compilation)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - start) / repeats

    def train_step():
        with autocast(args, device):
            loss = dsm_loss(model, x, sigmas).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def score_evals():
        with torch.inference_mode(), autocast(args, device):
            model(xs, sigmas[:1].expand(len(xs)))

    train_rate = args.batch_size / timed(train_step, steps)
    xs = torch.rand(args.sample_batch, 3, 32, 32, device=device)
    eval_rate = args.sample_batch / timed(score_evals, steps)
    nfe = args.num_scales * args.steps_per_level + int(args.denoise)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "parameters": sum(p.numel() for p in net.parameters()), "width": args.width,
              "batch_size": args.batch_size, "train_images_per_s": train_rate, "sample_batch": args.sample_batch,
              "score_evals_per_s": eval_rate, "peak_memory_gib": peak, "nfe_per_sample": nfe,
              "projected_hours_200_epochs": 200 * 50_000 / train_rate / 3600,
              "projected_hours_50k_samples": 50_000 * nfe / eval_rate / 3600, "amp": args.amp, "compile": args.compile}
    run_dir = common.make_run_dir("ncsn", args)
    common.save_config(run_dir, args)
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {run_dir}/bench.json")


def main(argv=None):
    preset = build_parser().parse_known_args(argv)[0].preset  # the preset decides the other defaults
    args = common.parse_args(build_parser(preset), argv)
    if args.ema is not None and not 0 <= args.ema < 1:
        raise UserError(f"--ema must be in [0, 1), got {args.ema}")
    if args.width % 2 or not all(m.isdigit() and int(m) > 0 for m in str(args.channel_mult).split(",")) \
            or len(str(args.channel_mult).split(",")) > 5:  # 32 -> 2 pixels after five levels
        raise UserError(f"--width must be even and --channel-mult 1 to 5 positive integers such as 1,2,2,2; got "
                        f"--width {args.width} --channel-mult {args.channel_mult}")
    if args.toy:
        run_dir = common.make_run_dir("ncsn_toy", args)
        toy_experiment(run_dir)
        print(f"figure: {run_dir}/toy.png")
    elif args.sample:
        run_sample(args)
    elif args.inpaint:
        run_inpaint(args)
    elif args.eval:
        run_eval(args)
    elif args.bench:
        run_bench(args)
    else:
        train(args)


if __name__ == "__main__":
    common.run_main(main)
