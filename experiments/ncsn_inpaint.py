"""Inpainting with a trained NCSN (NCSN Alg. 2): test images with a part hidden, filled in.

    python experiments/ncsn_inpaint.py runs/RUN                       # annealed Langevin, the run's
    python experiments/ncsn_inpaint.py runs/RUN --steps-per-level 1   # any flag of ncsn.py

Writes RUN/inpaint_right_half.png and RUN/inpaint_centre.png: eight test images, four completions
of each (rows: masked input, completions, original). The sampler is NCSN's Alg. 2: ncsn.py's
annealed Langevin (Alg. 1) with the observed pixels set, before every step, to the observation
blurred afresh to the current level, so that the free pixels always see a draw of p_sigma
consistent with it. The probability-flow ODE cannot do this: it has no noise to condition with.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the model files are scripts at the top of the repository

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
import ncsn  # noqa: E402


def observe(x, sigma, observed, mask):
    """The observed pixels (mask True) set to the observation plus fresh noise of std sigma."""
    return torch.where(mask, observed + sigma * torch.randn_like(x), x)


def inpainting_langevin(score_net, x, sigmas, steps, eps, observed, mask, denoise=True):
    """NCSN Alg. 2: ncsn.annealed_langevin's steps on x with the observation imposed before each,
    then Tweedie's denoising step; the observation itself in the observed pixels at the end."""
    for sigma in sigmas:
        alpha = eps * (sigma / sigmas[-1]) ** 2
        for _ in range(steps):
            x = observe(x, sigma, observed, mask)
            score = score_net(x, sigma.expand(len(x))).float()
            x = x + alpha * score + (2 * alpha).sqrt() * torch.randn_like(x)
    if denoise:
        x = observe(x, sigmas[-1], observed, mask)
        x = ncsn.finish(score_net, x, sigmas[-1], True)
    return torch.where(mask, observed, x)


@torch.inference_mode()
def inpaint(argv):
    args = ncsn.parse_args(["--sample", argv[0], *argv[1:]])  # the run's flags, as ncsn.py reads
    if args.sampler == "ode":
        raise common.UserError("--sampler ode cannot inpaint (it has no noise to condition with)")
    device, _, _ = ncsn.setup_device(args)
    net, stats = ncsn.load_trained(args.sample, args, device)
    sigmas, steps, eps = ncsn.sampler_levels(args)
    sigmas, nfe = sigmas.to(device), len(sigmas) * steps + args.denoise
    torch.manual_seed(args.seed)
    y = (common.load_images(args.data, args.data_root, "test")[:8].float() / 255).to(device)
    for name, hidden in (("right_half", np.s_[..., 16:]), ("centre", np.s_[..., 8:24, 8:24])):
        mask = torch.ones_like(y, dtype=torch.bool)  # True: observed
        mask[hidden] = False
        start = ncsn.gaussian_start(stats, sigmas[0].item(), device)(32)
        with ncsn.autocast(device, ncsn.amp_dtype(args, device)):
            x = inpainting_langevin(net, start, sigmas, steps, eps, y.repeat(4, 1, 1, 1),
                                    mask.repeat(4, 1, 1, 1), args.denoise)
        rows = [("masked", torch.where(mask, y, 0.5)), ("original", y)]
        rows[1:1] = [(f"completion {k + 1}", x[8 * k:8 * k + 8]) for k in range(4)]
        common.save_rows(rows, Path(args.sample) / f"inpaint_{name}.png",
                         title=f"inpainting: annealed Langevin, {nfe} network evaluations")
    print(f"wrote {args.sample}/inpaint_right_half.png and inpaint_centre.png")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python experiments/ncsn_inpaint.py RUN [ncsn.py flags]")
    try:
        inpaint(sys.argv[1:])
    except common.UserError as e:
        sys.exit(f"ncsn_inpaint: error: {e}")
