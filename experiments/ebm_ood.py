"""Out-of-distribution detection with IGEBM's protocol, offline: README's table "EBM: OOD AUROC".

    OMP_NUM_THREADS=1 python -m experiments.ebm_ood runs/RUN --limit-test 1000          # the sets that run offline
    OMP_NUM_THREADS=1 python -m experiments.ebm_ood runs/RUN --limit-test 1000 --ood svhn   # + SVHN (a download)

IGEBM's evaluation (the mixenergy task of its ebm_sandbox.py) scores CIFAR-10 test images and an equal number
of other images by -E(x) with dropout off, and reports the area under the ROC curve (1 = every test image
scored above every other image, 0.5 = chance). This is the same computation as the OOD part of
`ebm.py --eval`, without sampling or FID (no Inception weights are needed): ebm.ood_sets lists the sets.
Writes RUN/ood.json, the energy histograms RUN/ood_energies.png, and prints a Markdown table with each set's N.
"""

import argparse
import json
from pathlib import Path

import torch

import ebm


def histograms(energy, path):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, e in energy.items():
        ax.hist(e.numpy(), bins=40, alpha=0.5, density=True, label=name)
    ax.set_xlabel("energy E(x) (lower = more likely)"), ax.set_ylabel("density"), ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(path, dpi=80), plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run folder of ebm.py")
    p.add_argument("--limit-test", type=int, default=1000, help="test images (and images per OOD set)")
    p.add_argument("--ood", choices=("svhn",), help="also score SVHN's test set (downloaded by torchvision)")
    cli = p.parse_args(argv)
    torch.set_num_threads(1)
    args = ebm.parse_args(["--eval", cli.run, "--device", "cpu", "--limit-test", str(cli.limit_test)])
    device = torch.device("cpu")
    net, _ = ebm.load_trained(cli.run, args, device)
    test = ebm.test_subset(args, cli.limit_test)
    sets = ebm.ood_sets(test, torch.Generator().manual_seed(args.seed))
    if cli.ood == "svhn":
        sets["svhn"] = ebm.load_svhn(args.data_root, len(test))
    energy = {name: ebm.energies_of(net, x, args, device, None) for name, x in {"test images": test, **sets}.items()}
    rows = {name: {"n": len(sets[name]), "auroc": ebm.auroc(-energy["test images"], -energy[name])} for name in sets}
    result = {"run": cli.run, "n_test": len(test), "ood": rows}
    (Path(cli.run) / "ood.json").write_text(json.dumps(result, indent=2))
    histograms(energy, Path(cli.run) / "ood_energies.png")
    print(f"| CIFAR-10 test images (N = {len(test)}) against | N | AUROC of -E |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['n']} | {row['auroc']:.3f} |")
    return result


if __name__ == "__main__":
    main()
