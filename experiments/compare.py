"""The three models side by side: one table and one figure for several run folders.

    python experiments/compare.py runs/ncsn__A runs/vae__B runs/ebm__C     # runs/compare.md, .png

A column a run does not have is shown as missing, never invented. Test bits/dim comes from
RUN/likelihood.json (experiments/likelihood.py: its method, N and spread beside it), else from the
VAE's eval.json (IWAE) or its last logged test bound (ELBO). FID / IS / KID depend on N and on the
feature extractor: 'tiny-random' scores are offline test numbers, not comparable with papers.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import common  # noqa: E402


def read(run_dir, name):
    path = Path(run_dir) / name
    return json.loads(path.read_text()) if path.exists() else {}


def bits_per_dim(run_dir, evaluation, rows):
    """(bits/dim, 'method, N, spread') of a run: its likelihood.json first, then what it logged."""
    likelihood = read(run_dir, "likelihood.json")
    if "bits_per_dim" in likelihood:
        spread = likelihood.get("spread")
        return likelihood["bits_per_dim"], f"{likelihood['method']}, N {likelihood['n']:,}" + \
            (f", +- {spread:.3f}" if spread is not None else "")
    if "test_iwae_bpd" in evaluation:
        return (evaluation["test_iwae_bpd"],
                f"IWAE K {evaluation['iw_samples']}, N {evaluation['n_test']:,}")
    last = next((r["test_bpd"] for r in reversed(rows) if "test_bpd" in r), None)
    return last, None if last is None else "ELBO (last epoch)"


def run_row(run_dir):
    """One row of the table from what a run folder holds; None where it holds nothing."""
    rows, evaluation = common.read_metrics(run_dir), read(run_dir, "eval.json")
    bench, summary = read(run_dir, "bench.json"), read(run_dir, "summary.json")
    speeds = sorted(r["img_per_s"] for r in rows if "img_per_s" in r)
    epoch_seconds = [r["epoch_seconds"] for r in rows if "epoch_seconds" in r]
    try:
        ckpt = torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True,
                          mmap=True)  # lazily: only the numbers below are read
    except Exception:  # missing, corrupt or not ours: its numbers are shown as missing
        ckpt = {}
    params = summary.get("parameters") or bench.get("parameters") or \
        (sum(v.numel() for v in ckpt["net"].values()) if "net" in ckpt else None)
    bpd, method = bits_per_dim(run_dir, evaluation, rows)
    return {"run": Path(run_dir).name, "model": Path(run_dir).name.split("__")[0],
            "parameters": params, "img_per_s": speeds[len(speeds) // 2] if speeds else
            bench.get("train_images_per_s"),
            "epoch_seconds": sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else None,
            "epochs": ckpt.get("epoch"), "bits_per_dim": bpd, "bpd_method": method,
            "fid": evaluation.get("fid"), "is": evaluation.get("is_mean"),
            "kid": evaluation.get("kid_mean"), "n": evaluation.get("n_samples"),
            "extractor": evaluation.get("extractor"),
            "sampling_s_per_1000": evaluation.get("sampling_seconds_per_1000"),
            "nfe_per_sample": evaluation.get("nfe_per_sample") or bench.get("nfe_per_sample")}


COLUMNS = [("model", "model", "{}"), ("run", "run", "{}"), ("parameters", "parameters", "{:,}"),
           ("img_per_s", "train img/s", "{:.1f}"), ("epoch_seconds", "s / epoch", "{:.0f}"),
           ("epochs", "epochs", "{}"), ("bits_per_dim", "test bits/dim", "{:.3f}"),
           ("bpd_method", "(method, N, spread)", "{}"), ("fid", "FID", "{:.2f}"),
           ("is", "IS", "{:.2f}"), ("kid", "KID", "{:.4f}"), ("n", "N", "{:,}"),
           ("extractor", "features", "{}"), ("sampling_s_per_1000", "sampling s / 1000", "{:.1f}"),
           ("nfe_per_sample", "NFE / sample", "{:,}")]


def compare(run_dirs, out_dir="runs"):
    """OUT/compare.md (the table) and OUT/compare.png (each run's latest sample grid)."""
    for run in run_dirs:
        if not (Path(run) / "config.json").exists():
            raise common.UserError(f"{run} is not a run folder (no config.json)")
    rows = [run_row(run) for run in run_dirs]
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join("—" if row[k] is None else f.format(row[k])
                                       for k, _, f in COLUMNS) + " |")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text("\n".join(lines)
                                        + "\n\n— : not measured for this run (never invented). "
                                        + __doc__.split("\n\n")[2].replace("\n", " ") + "\n")
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 4.4), squeeze=False)
    for ax, run, row in zip(axes[0], run_dirs, rows):
        grids = (sorted(Path(run).glob("samples/epoch_*.png"))[-1:]
                 or sorted(Path(run).glob("samples.png")))
        if grids:
            ax.imshow(plt.imread(grids[0]))
        ax.set_title(row["run"].replace("__", "\n", 1), fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_dir / "compare.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    print("\n".join(lines) + f"\nwrote {out_dir}/compare.md and {out_dir}/compare.png")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="runs", help="where compare.md and compare.png go")
    cli = p.parse_args()
    try:
        compare(cli.runs, cli.out)
    except common.UserError as e:
        sys.exit(f"compare.py: error: {e}")
