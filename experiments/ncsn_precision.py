"""bf16 autocast against float32 in a trained score network, per noise level, measured on the CPU:
experiments/README.md's table "Precision: bf16 at the smallest noise levels".

    OMP_NUM_THREADS=1 python -m experiments.ncsn_precision runs/RUN --n 256

At sigma = 0.01 the noise the network must remove is a few 8-bit levels, and bf16 rounds its input
by up to half of one. For each sigma the same test images and the same noise z go through the
network three ways: float32; bf16 autocast everywhere (the first conv included); bf16 autocast with
the first conv in float32 (ncsn.py); and the same with the first conv's output cast to bf16
(so that it does not promote the 32x32 level of the U-Net to float32 under autocast). Reported: the
score's relative error against float32, the test DSM loss of each, and how much the remaining error
moves a pixel in the final step x + sigma^2 s.
"""

import argparse

import torch

import common
import ncsn


class InBfloat16(torch.nn.Module):
    """Run a layer under bf16 autocast even inside ScoreNet's float32 region: undoes the fix, for
    comparison."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, h):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.layer(h)


class OutBfloat16(torch.nn.Module):
    """Run a layer in float32 as ScoreNet does, and hand its output on in bf16: what the network's
    32x32 level would see if the head's float32 output did not promote it to float32 under
    autocast."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, h):
        return self.layer(h).to(torch.bfloat16)


@torch.inference_mode()
def score(net, x, sigma, bf16, head_in_bf16=False, head_out_bf16=False):
    head = net.head
    net.head = InBfloat16(head) if head_in_bf16 else OutBfloat16(head) if head_out_bf16 else head
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return net(x, torch.full((len(x),), sigma)).float()
    finally:
        net.head = head


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a trained ncsn.py run folder")
    p.add_argument("--n", type=int, default=256, help="test images")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    args = ncsn.parse_args(["--sample", a.run, "--device", "cpu"])
    net, _ = ncsn.load_trained(a.run, args, torch.device("cpu"))
    x = common.load_images(args.data, args.data_root, "test")[:a.n].float() / 255
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))

    def dsm(s, sigma):
        return (0.5 * (sigma * s + z).pow(2).flatten(1).sum(1)).mean().item()

    def error(s, s32):
        return 100 * ((s - s32).norm() / s32.norm()).item()

    print("| sigma | score's error, all bf16 | first conv float32 | first conv float32, its output "
          "bf16 | test DSM, float32 | all bf16 | first conv float32 | first conv float32, output "
          "bf16 | denoising step's change, 8-bit levels |\n|" + "---|" * 9)
    for sigma in (50.0, 10.0, 1.0, 0.3, 0.1, 0.03, 0.01):
        noisy = x + sigma * z
        s32 = score(net, noisy, sigma, bf16=False)
        s_all = score(net, noisy, sigma, bf16=True, head_in_bf16=True)
        s_now = score(net, noisy, sigma, bf16=True)
        s_out = score(net, noisy, sigma, bf16=True, head_out_bf16=True)
        # a pixel's move in x + sigma^2 s
        step_change = (sigma**2 * (s_now - s32)).abs().mean().item() * 255
        print(f"| {sigma:g} | {error(s_all, s32):.2f}% | {error(s_now, s32):.2f}% | "
              f"{error(s_out, s32):.2f}% | {dsm(s32, sigma):.2f} | {dsm(s_all, sigma):.2f} | "
              f"{dsm(s_now, sigma):.2f} | {dsm(s_out, sigma):.2f} | {step_change:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
