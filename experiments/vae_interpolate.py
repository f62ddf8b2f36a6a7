"""Walks in a VAE's latent space: what lies between the codes of two test images.

    python experiments/vae_interpolate.py runs/RUN              # RUN/interpolations.png
    python experiments/vae_interpolate.py runs/RUN --seed 2     # (the run's flags are its defaults)

Encode two test images, take their posterior means E_q[z|x], and decode the means E[x|z] of the
latents on the straight line between them: a smooth path of pictures says the decoder fills the
space between codes, not only the codes themselves. Six pairs, eight steps each, drawn by --seed.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the model files are scripts at the top of the repository

import torch  # noqa: E402

import common  # noqa: E402
import vae  # noqa: E402


@torch.inference_mode()
def interpolate(argv, pairs=6, steps=8):
    """RUN/interpolations.png: the means E[x|z] along straight lines between the posterior means of
    pairs of test images."""
    args = vae.parse_args(["--sample", argv[0], *argv[1:]])  # the run's flags, as vae.py reads them
    device, _, _ = vae.setup_device(args)
    net, _ = vae.load_trained(args.sample, args, device)
    test_images = common.load_images(args.data, args.data_root, "test")
    if len(test_images) < 2:
        raise common.UserError("interpolation needs at least 2 test images")
    pick = torch.randperm(len(test_images), generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for i in range(min(pairs, len(pick) // 2)):
        ends = test_images[pick[2 * i:2 * i + 2]].to(device).float() / 255  # (2, 3, 32, 32)
        with vae.autocast(device, vae.amp_dtype(args, device)):
            mu = net.encode(ends * 2 - 1)[0]
            t = torch.linspace(0, 1, steps, device=device).view(-1, 1, 1, 1)
            between = vae.decode_images(net, (1 - t) * mu[0] + t * mu[1], drawn=False)
        rows.append((f"pair {i + 1}", torch.cat([ends[:1], between.float(), ends[1:]])))
    common.save_rows(rows, Path(args.sample) / "interpolations.png",
                     title="test image, means E[x|z] between the posterior means, test image")
    print(f"interpolations written to {args.sample}/interpolations.png")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python experiments/vae_interpolate.py RUN [vae.py flags]")
    try:
        interpolate(sys.argv[1:])
    except common.UserError as e:
        sys.exit(f"vae_interpolate: error: {e}")
