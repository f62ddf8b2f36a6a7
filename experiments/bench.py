"""Training and sampling speed of one model file, and its peak memory: printed and saved as JSON.

    python experiments/bench.py ncsn                     # the default (paper-sized) network
    python experiments/bench.py vae --batch-size 8       # any flag of the model file
    python experiments/bench.py ebm --compile            # with torch.compile
    python experiments/bench.py ncsn --memory-format contiguous  # the other memory layout (GPU A/B)

It times the model file's own build() and train_step() (the same optimiser, precision and
compilation as training) and its sampler's network evaluations, after one warm-up call each, and
writes runs/<model>-bench__<name>__<seed>__<time>/bench.json with the device's name, the precision,
parameters, images per second, peak memory and the hours that 200 epochs of CIFAR-10 would take.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the model files are scripts at the top of the repository

import torch  # noqa: E402

import ebm  # noqa: E402
import ncsn  # noqa: E402
import vae  # noqa: E402

MODELS = {"ncsn": ncsn, "vae": vae, "ebm": ebm}


def seconds_per_call(fn, repeats):
    """Mean wall time of fn() after one warm-up call (allocator, cuDNN autotuning, compilation)."""
    fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def machine(device):
    """What a benchmark ran on, and its peak memory (GPU: allocated; CPU: resident set, Unix)."""
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    return {"device": torch.cuda.get_device_name(device) if cuda else
            f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__,
            "peak_memory_gib": peak / 2**30}


def steps(name, module, args, device, dtype):
    """(one training step, k network evaluations of the sampler on a batch, k, evaluations a
    sample), the first two functions of nothing, on random data of the right shape."""
    net, _, optimizer, scaler = module.build(args, device)
    model = torch.compile(net) if args.compile else net
    layout = (torch.channels_last if args.memory_format == "channels_last"
              else torch.contiguous_format)
    x = torch.rand(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=layout)
    if args.memory_format is not None:  # the A/B: the network in the other layout
        net.to(memory_format=layout)
    if name == "ncsn":
        sigmas = ncsn.geometric_sigmas(args.sigma_max, args.sigma_min, args.num_scales).to(device)
        levels, steps_per_level, _ = ncsn.sampler_levels(args)
        nfe = (len(levels) * steps_per_level if args.sampler == "ald" else 2 * len(levels) - 2) + \
            int(args.denoise)

        def sample():
            with torch.inference_mode(), ncsn.autocast(device, dtype):
                model(x, sigmas[:1].expand(len(x)))
        return ((lambda: ncsn.train_step(model, net, optimizer, scaler, x, sigmas, args, dtype)),
                sample, 1, nfe)
    if name == "vae":
        state = {"grad_norm_avg": torch.tensor(float("inf"), device=device),
                 "clipped_outliers": torch.zeros((), device=device)}
        z = torch.randn(len(x), net.latent_channels, net.latent_size, net.latent_size,
                        device=device)

        def sample():
            with vae.autocast(device, dtype):
                vae.decode_images(net, z)
        return ((lambda: vae.train_step(model, net, optimizer, scaler, x, 1.0, args, state, dtype)),
                sample, 1, 1)
    buffer = ebm.ReplayBuffer(max(args.batch_size, 256), (3, 32, 32), device, args.restart_rate)

    def sample():  # as --sample runs its chains: dropout off
        net.eval()
        with ebm.autocast(device, dtype):
            ebm.sgld(lambda v: model(v).float(), x, args.sgld_steps, args.sgld_step_size,
                     args.sgld_noise, args.sgld_grad_clip)
        net.train()
    return ((lambda: ebm.train_step(model, net, optimizer, scaler, buffer, x, args, dtype)),
            sample, args.sgld_steps, args.sgld_steps)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=MODELS, help="which model file")
    p.add_argument("--repeats", type=int, default=5, help="timed calls after the warm-up")
    p.add_argument("--memory-format", choices=["channels_last", "contiguous"],
                   help="lay the network and data out this way (default: the model file's choice)")
    own, rest = p.parse_known_args(argv)
    module = MODELS[own.model]
    args = module.parse_args(rest)
    args.memory_format = own.memory_format
    device, _, _ = module.setup_device(args)
    dtype = module.amp_dtype(args, device)
    torch.manual_seed(args.seed)
    train_step, sample, evaluations, nfe = steps(own.model, module, args, device, dtype)
    train_s = seconds_per_call(train_step, own.repeats)
    sample_s = seconds_per_call(sample, max(1, own.repeats // 3 if own.model == "ebm"
                                            else own.repeats))
    params = sum(p.numel() for p in module.build(args, device)[0].parameters())
    result = {**machine(device), "model": own.model, "parameters": params, "width": args.width,
              "precision": str(dtype or torch.float32).removeprefix("torch."),
              "compile": args.compile, "memory_format": own.memory_format or "the model file's",
              "batch_size": args.batch_size, "train_images_per_s": args.batch_size / train_s,
              "network_evaluations_per_s": args.batch_size * evaluations / sample_s,
              "nfe_per_sample": nfe,
              "projected_hours_200_epochs": 200 * 50_000 * train_s / args.batch_size / 3600,
              "projected_hours_50k_samples": 50_000 * nfe * sample_s / evaluations / args.batch_size
              / 3600}
    run_dir = module.new_run_dir(args, "bench")
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2) + f"\nwrote {run_dir}/bench.json")
    return result


if __name__ == "__main__":
    try:
        main()
    except ncsn.UserError as e:
        sys.exit(f"bench.py: error: {e}")
