"""Out-of-distribution detection with IGEBM's protocol, offline: experiments/README.md's OOD table.

    OMP_NUM_THREADS=1 python -m experiments.ebm_ood runs/RUN --limit-test 1000   # the sets offline
    OMP_NUM_THREADS=1 python -m experiments.ebm_ood runs/RUN --limit-test 1000 --ood svhn   # + SVHN

-E(x) is an unnormalised log-likelihood, so an energy model should rank test images above other
images. IGEBM's evaluation (the mixenergy task of its ebm_sandbox.py) scores CIFAR-10 test images
and as many other images by -E(x) with dropout off, and reports the area under the ROC curve
(1: every test image scored above every other image; 0.5: chance). Its sets are SVHN, CIFAR-100,
textures, the average of two test images and N(0.5, 0.5^2) noise; the last two run offline, and so
do uniform noise, constant colours, noisy and pixel-shuffled images. Writes RUN/ood.json and the
energy histograms RUN/ood_energies.png, and prints a Markdown table with each set's N.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import common  # noqa: E402
import ebm  # noqa: E402
from experiments import measures  # noqa: E402


def test_images(args, n):
    """The first n test images at the centres of their dequantization bins, (n, 3, 32, 32) in
    [0, 1]."""
    return (common.load_images(args.data, args.data_root, "test")[:n].float() + 0.5) / 256


def ood_sets(test, generator):
    """Out-of-distribution inputs, each like `test` (N, 3, 32, 32)."""
    n = len(test)
    noisy = (test + 0.3 * torch.randn(test.shape, generator=generator)).clamp(0, 1)
    shuffled = torch.stack([x.flatten(1)[:, torch.randperm(1024, generator=generator)]
                            .view(3, 32, 32) for x in test])
    return {"uniform noise": torch.rand(n, 3, 32, 32, generator=generator),
            "constant colour": torch.rand(n, 3, 1, 1, generator=generator).expand(n, 3, 32, 32),
            "average of two test images (IGEBM)": (test + test.roll(1, 0)) / 2,
            "gaussian noise 0.5 + 0.5 N(0, 1) (IGEBM)":
                0.5 + 0.5 * torch.randn(test.shape, generator=generator),
            "heavy noise (sigma 0.3)": noisy, "shuffled pixels": shuffled}


def load_svhn(data_root, n):
    from torchvision.datasets import SVHN

    root = Path(data_root) / "svhn"
    try:
        data = SVHN(str(root), split="test", download=True).data  # (N, 3, 32, 32) uint8
    except Exception as e:  # no network, a refused connection, a corrupt file...
        raise common.UserError(f"--ood svhn: SVHN is not in {root}/ and could not be downloaded "
                               f"({type(e).__name__}): put test_32x32.mat in {root}/") from None
    return (torch.from_numpy(data[:n]).float() + 0.5) / 256  # the bin centres, as the test images


@torch.no_grad()
def energies(net, x, batch_size=256):
    return torch.cat([net(b).float() for b in x.split(batch_size)])


def histograms(energy, path):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, e in energy.items():
        ax.hist(e.numpy(), bins=40, alpha=0.5, density=True, label=name)
    (ax.set_xlabel("energy E(x) (lower = more likely)"), ax.set_ylabel("density"),
     ax.legend(fontsize=7))
    fig.tight_layout(), fig.savefig(path, dpi=80), plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run folder of ebm.py")
    p.add_argument("--limit-test", type=int, default=1000,
                   help="test images (and images per OOD set)")
    p.add_argument("--ood", choices=("svhn",),
                   help="also score SVHN's test set (downloaded by torchvision)")
    cli = p.parse_args(argv)
    torch.set_num_threads(1)
    args = ebm.parse_args(["--eval", cli.run, "--device", "cpu"])
    net, _ = ebm.load_trained(cli.run, args, torch.device("cpu"))  # dropout off
    test = test_images(args, cli.limit_test)
    sets = ood_sets(test, torch.Generator().manual_seed(args.seed))
    if cli.ood == "svhn":
        sets["svhn"] = load_svhn(args.data_root, len(test))
    energy = {name: energies(net, x) for name, x in {"test images": test, **sets}.items()}
    rows = {name: {"n": len(sets[name]),
                   "auroc": measures.auroc(-energy["test images"], -energy[name])}
            for name in sets}
    result = {"run": cli.run, "n_test": len(test), "ood": rows}
    (Path(cli.run) / "ood.json").write_text(json.dumps(result, indent=2))
    histograms(energy, Path(cli.run) / "ood_energies.png")
    print(f"| CIFAR-10 test images (N = {len(test)}) against | N | AUROC of -E |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['n']} | {row['auroc']:.3f} |")
    return result


if __name__ == "__main__":
    try:
        main()
    except common.UserError as e:
        sys.exit(f"ebm_ood: error: {e}")
