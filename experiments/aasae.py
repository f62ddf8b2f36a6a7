"""AASAE (Falcon et al. 2021, https://arxiv.org/abs/2107.12329): vae.py's network and likelihood
trained as a representation learner, Eq. (6) of vae.py's docstring with beta = 0: no KL term, and
the encoder sees a random SimCLR view t(x) of each image while the decoder scores x itself.

    python experiments/aasae.py --epochs 200                 # any of vae.py's flags; beta = 0 here
    python experiments/aasae.py --resume runs/RUN            # (vae.py refuses: it has no views)
    python vae.py --sample runs/RUN                          # or --eval: vae.py's network
    python experiments/vae_probe.py runs/RUN                 # the linear probe of its codes
    torchrun --standalone --nproc_per_node=8 experiments/aasae.py --epochs 200

AASAE's CIFAR-10 setting (Lightning-Universe/paper-AAVAE, src/transforms/transforms.py; its
README trains with no KL, no warm-up and no free bits): a random resized crop (area 0.08-1, aspect
3/4-4/3), flip p = 0.5, ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8, grayscale p = 0.2, no blur.
Every image draws its own view, whole batches at once on the device; the jitter's order is fixed
(torchvision draws it). The draws come from the global generator, which vae.py reseeds every epoch:
a resumed run replays the same views. experiments/vae_aasae.py compares AASAE with the VAE at equal
CPU time.
"""

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the model files are scripts at the top of the repository

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vae  # noqa: E402

# AASAE's flags (a flag given later wins): runs are vae__aasae__<seed>__<time>, vae.py's network
AASAE = ["--kl-weight", "0", "--kl-warmup", "0", "--free-bits", "0", "--name", "aasae"]


def grayscale(x):
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # torchvision's weights: (B, 1, H, W)


def shift_hue(x, turns):
    """Rotate each image's hue by `turns` of the colour circle, as torchvision's adjust_hue: the max
    and min of R, G, B stay, the hue h (in sixths) moves, and HSV -> RGB rebuilds the pixel as
    c_n = max - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6, n = 5, 3, 1."""
    (r, g, b), high = x.unbind(1), x.amax(1)
    chroma = high - x.amin(1)
    c = chroma.clamp(min=1e-12)  # grey pixels (chroma 0) have no hue, and keep their value
    hue = torch.where(high == r, (g - b) / c,
                      torch.where(high == g, (b - r) / c + 2, (r - g) / c + 4))
    hue = (hue + 6 * turns.view(-1, 1, 1)) % 6
    k = (torch.arange(5.0, 0, -2, device=x.device).view(1, 3, 1, 1) + hue.unsqueeze(1)) % 6
    return high.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def resized_crop(x, width, height, centre_x, centre_y, flip):
    """Crop each image to a box (sizes as fractions of the image, centre in [-1, 1]) and resize it
    back, mirrored where flip is -1: one grid_sample whose grid maps output pixels into the box."""
    zero = torch.zeros_like(width)
    theta = torch.stack([width * flip, zero, centre_x, zero, height, centre_y], 1).view(-1, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_jitter(x, brightness, contrast, saturation, hue):
    """torchvision's adjust_brightness, _contrast, _saturation and _hue, a factor per image (B,)."""
    factor = lambda f: f.view(-1, 1, 1, 1)  # noqa: E731
    x = (factor(brightness) * x).clamp(0, 1)
    mean = grayscale(x).mean((1, 2, 3), keepdim=True)
    x = (mean + factor(contrast) * (x - mean)).clamp(0, 1)
    return shift_hue((grayscale(x) + factor(saturation) * (x - grayscale(x))).clamp(0, 1), hue)


def simclr_view(x):
    """A random SimCLR view of each image of x (B, 3, H, W) in [0, 1]. Draws come from the global
    generator, which each epoch reseeds: a resumed run replays the same views."""
    u = lambda: torch.rand(len(x), device=x.device)  # noqa: E731  one U(0, 1) per image
    area, ratio = 0.08 + 0.92 * u(), torch.exp(math.log(3 / 4) + math.log(16 / 9) * u())
    # a box larger than the image is shrunk to fit (torchvision draws again, then centre-crops)
    width, height = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    x = resized_crop(x, width, height, (1 - width) * (2 * u() - 1), (1 - height) * (2 * u() - 1),
                     torch.where(u() < 0.5, -1.0, 1.0))
    jittered = colour_jitter(x, *(1 + 0.4 * (2 * u() - 1) for _ in range(3)), 0.1 * (2 * u() - 1))
    x = torch.where(u().view(-1, 1, 1, 1) < 0.8, jittered, x)
    return torch.where(u().view(-1, 1, 1, 1) < 0.2, grayscale(x).expand_as(x), x)


def main(argv=None):
    """Train (or resume) an AASAE run: vae.train with simclr_view as the encoder's input. The run
    records views = 'simclr' in its config.json, so that vae.py --resume refuses it."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if {"-h", "--help"} & {*argv}:  # (the flags' list that follows is vae.py's)
        print(__doc__.split("\n\n")[0] + "\n\nIt takes vae.py's flags:\n")
    # a new run starts from AASAE's flags; a resumed one keeps those in its config.json
    args = vae.parse_args(argv if "--resume" in argv else AASAE + argv)
    if args.sample or args.eval:
        raise vae.UserError("--sample and --eval of an AASAE run: use vae.py (the same network)")
    args.views = "simclr"
    return vae.train(args, view=simclr_view)


if __name__ == "__main__":
    try:
        main()
    except vae.UserError as e:  # bad input, or a run that diverged: one line, exit status 1
        sys.exit(f"aasae.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the last checkpoint.pt is intact; continue with --resume RUN")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
