"""Inpainting with a trained EBM: the centre of test images hidden, then filled in by SGLD.

    python experiments/ebm_inpaint.py runs/RUN              # RUN/inpaint.png
    python experiments/ebm_inpaint.py runs/RUN --steps 200  # any flag of ebm.py

An energy model scores whole images, so it can complete a partial one: ebm.py's SGLD, run on the
hidden 16x16 centre alone (sgld's mask), moves those pixels towards low energy while the observed
ones stay fixed. Rows: the masked input, three completions from independent uniform noise, and the
original. The chains run --steps SGLD steps (default: the run's K).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the model files are scripts at the top of the repository

import torch  # noqa: E402

import common  # noqa: E402
import ebm  # noqa: E402


def inpaint(argv, completions=3):
    """RUN/inpaint.png: the centre 16x16 of 8 test images filled by SGLD on those pixels only."""
    args = ebm.parse_args(["--sample", argv[0], *argv[1:]])  # the run's flags, as ebm.py reads them
    device, _, _ = ebm.setup_device(args)
    net, _ = ebm.load_trained(args.sample, args, device)
    torch.manual_seed(args.seed)
    test = common.load_images(args.data, args.data_root, "test")[:8].to(device)
    test = (test.float() + 0.5) / 256  # the centres of the dequantization bins
    mask = torch.zeros(1, 1, 32, 32, device=device)
    mask[..., 8:24, 8:24] = 1  # 1: a free pixel
    rows = [("masked", test * (1 - mask) + 0.5 * mask)]
    for c in range(completions):
        start = torch.where(mask.bool(), torch.rand_like(test), test)
        x, _ = ebm.igebm_sgld(net, start, args.steps, args, ebm.amp_dtype(args, device), mask)
        rows.append((f"completion {c + 1}", x))
    common.save_rows(rows + [("original", test)], Path(args.sample) / "inpaint.png",
                     title=f"inpainting: SGLD on the masked pixels, {args.steps} steps")
    print(f"wrote {args.sample}/inpaint.png")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python experiments/ebm_inpaint.py RUN [ebm.py flags]")
    try:
        inpaint(sys.argv[1:])
    except common.UserError as e:
        sys.exit(f"ebm_inpaint: error: {e}")
