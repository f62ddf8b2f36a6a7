r"""bf16 autocast against float32 in a trained VAE, measured on the CPU: experiments/README.md,
"Precision: bf16 and the mixture likelihood". From the repository root:

    OMP_NUM_THREADS=1 python -m experiments.vae_precision \
        runs/aasae_experiment/vae__aasae-exp-vae__1__*

On a GPU, training and evaluation run under bf16 autocast (8 bits of mantissa: a relative rounding
of up to 2^-9). The likelihood itself is computed in float32 (`VAE.decode` casts), but the mixture
parameters come out of a convolution that ran in bf16. This script evaluates the same test images
with the same noise eps in float32 and under torch.autocast("cpu", torch.bfloat16) in three
arrangements (everything in bf16; the decoder's last convolution in float32; both networks' last
convolutions in float32) and reports the test bits/dim, the per-pixel log-likelihood differences,
and the parameter errors in units that matter: a mean's error in bins (2/255) and relative to the
component's scale. Writes experiments/results/vae_precision.json and the table beside it (.md).
"""

import argparse
import json
import time
from pathlib import Path

import torch

import common
import vae

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "experiments" / "results" / "vae_precision.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a trained vae.py run folder (beta = 1)")
    p.add_argument("--n", type=int, default=1000, help="test images")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--out", default=str(RESULT),
                   help="JSON file for the numbers; the table goes beside it (.md)")
    return p.parse_args(argv)


def run_head(head, h, float32_head):
    """The last convolution of a network, in float32 (autocast off, input cast up) or as autocast
    would run it."""
    if not float32_head:
        return head(h).float()
    with torch.autocast("cpu", enabled=False):
        return head(h.float()).float()


@torch.no_grad()
def evaluate(net, x, eps, bf16, encoder_head_fp32=False, decoder_head_fp32=False, z=None):
    """(mu, logvar, z, params, log p(x|z) per pixel) with the given arrangement; given z, the
    decoder only."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if z is None:
            h = net.encoder[:-1](x)
            mu, logvar = run_head(net.encoder[-1], h, encoder_head_fp32).chunk(2, dim=1)
            z = mu + (0.5 * logvar).exp() * eps
        else:
            mu = logvar = None
        params = run_head(net.decoder[-1], net.decoder[:-1](z), decoder_head_fp32)
    log_px = vae.discretized_logistic_mixture_logp(x, params, net.mixtures)  # float32, (B, H, W)
    return mu, logvar, z, params, log_px


class Summary:
    """Mean, max and quantiles of a stream of non-negative values (the quantiles from a sample of
    fixed size per batch)."""

    def __init__(self):
        self.total, self.count, self.max, self.sample = 0.0, 0, 0.0, []

    def add(self, values):
        values = values.detach().double().flatten()
        self.total, self.count = self.total + values.sum().item(), self.count + len(values)
        self.max = max(self.max, values.max().item())
        pick = torch.randperm(len(values), generator=torch.Generator().manual_seed(0))[:20_000]
        self.sample.append(values[pick])

    def __call__(self, *quantiles):
        sample = torch.cat(self.sample)
        return {"mean": self.total / self.count, "max": self.max,
                **{f"p{round(100 * q)}": sample.quantile(q).item() for q in quantiles}}


ARRANGEMENTS = {"float32": dict(bf16=False), "bf16 everywhere": dict(bf16=True),
                "bf16, decoder's last conv in float32": dict(bf16=True, decoder_head_fp32=True),
                "bf16, both last convs in float32": dict(bf16=True, encoder_head_fp32=True,
                                                         decoder_head_fp32=True)}
KEYS = ("pixel_logp_abs_diff_nats", "mean_abs_err_bins", "mean_abs_err_over_scale",
        "log_scale_abs_err", "logit_abs_err")


def measure(net, images, batch_size):
    """Bound totals (nats) and CPU seconds per arrangement, error statistics against float32, and
    the component scales in bins."""
    g = torch.Generator().manual_seed(0)
    totals = {name: {"distortion": 0.0, "rate": 0.0, "seconds": 0.0} for name in ARRANGEMENTS}
    stats = {name: {key: Summary() for key in KEYS} for name in ARRANGEMENTS}
    scales_in_bins = Summary()
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].float() / 127.5 - 1
        eps = torch.randn(len(x), net.latent_channels, net.latent_size, net.latent_size,
                          generator=g)
        z_ref, params_ref, log_px_ref = evaluate(net, x, eps, bf16=False)[2:]
        ref = vae.split_mixture_params(params_ref, net.mixtures)
        scales_in_bins.add(ref[2].exp() / (2 / 255))
        for name, arrangement in ARRANGEMENTS.items():
            tick = time.process_time()
            mu, logvar, _, _, log_px = evaluate(net, x, eps, **arrangement)  # the whole pipeline
            totals[name]["seconds"] += time.process_time() - tick
            totals[name]["distortion"] -= log_px.double().sum().item()
            totals[name]["rate"] += vae.gaussian_kl(mu, logvar).double().sum().item()
            # the decoder alone, fed the float32 encoder's z
            _, _, _, params, log_px = evaluate(net, x, eps, z=z_ref, **arrangement)
            ours = vae.split_mixture_params(params, net.mixtures)
            errors = ((log_px - log_px_ref).abs(), (ours[1] - ref[1]).abs() / (2 / 255),
                      (ours[1] - ref[1]).abs() / ref[2].exp(), (ours[2] - ref[2]).abs(),
                      (ours[0] - ref[0]).abs())
            for key, values in zip(KEYS, errors):
                stats[name][key].add(values)
    return totals, stats, scales_in_bins


def table(result):
    scales = result["component_scale_in_bins"]
    lines = [f"{result['n_test']} test images of {result['run']}; component scales s: median "
             f"{scales['p50']:.2f} bins, 1st percentile {scales['p1']:.2f} bins (a bin is 2/255)",
             "", "| arrangement | test bits/dim | minus float32 | per-pixel abs. log p difference, "
             "nats: mean / p99 / max | mean's abs. error, bins: mean / p99 / max | mean's abs. "
             "error / s: mean / p99 |", "|---|---|---|---|---|---|"]
    reference = result["arrangements"]["float32"]["test_bpd"]
    for name, r in result["arrangements"].items():
        px, mb = r["pixel_logp_abs_diff_nats"], r["mean_abs_err_bins"]
        ms = r["mean_abs_err_over_scale"]
        lines.append(f"| {name} | {r['test_bpd']:.5f} | {r['test_bpd'] - reference:+.5f} | "
                     f"{px['mean']:.1e} / {px['p99']:.1e} / {px['max']:.1e} | {mb['mean']:.3f} / "
                     f"{mb['p99']:.3f} / {mb['max']:.3f} | {ms['mean']:.4f} / {ms['p99']:.4f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run)
    run_args = vae.parse_args(["--sample", str(run)])
    net, _ = vae.load_trained(run, run_args, torch.device("cpu"))
    images = common.load_images(run_args.data, run_args.data_root, "test")[:args.n]
    totals, stats, scales_in_bins = measure(net, images, args.batch_size)
    n = len(images)
    # the run as the README's command names it (from the repository root), not where it lies here
    name = run.resolve().relative_to(ROOT) if run.resolve().is_relative_to(ROOT) else run.name
    result = {"run": str(name), "n_test": n, "torch": torch.__version__,
              "device": "cpu, 1 thread", "component_scale_in_bins": scales_in_bins(0.01, 0.5),
              "arrangements": {}}
    for arrangement, total in totals.items():
        distortion, rate = (common.bits_per_dim(total[k] / n) for k in ("distortion", "rate"))
        result["arrangements"][arrangement] = {
            "test_bpd": distortion + rate, "rate_bpd": rate, "cpu_seconds": total["seconds"],
            **{key: summary(0.99) for key, summary in stats[arrangement].items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"written to {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
