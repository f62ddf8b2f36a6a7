"""Training speed of ncsn.py's score network against the official NCSNv2 CIFAR-10 network.

    OMP_NUM_THREADS=1 python experiments/ncsn_vs_official.py --official PATH --widths 112 --rounds 4

PATH is a clone of github.com/ermongroup/ncsnv2. Their side is their own code, imported from PATH:
`NCSNv2` (models/ncsnv2.py) built from configs/cifar10.yml, their `anneal_dsm_score_estimation`
loss, Adam with their optimiser settings and their `EMAHelper`. Our side is ncsn.py's `build`,
`train_step` and `update_ema` at each width. Both get the same random batches; their training
steps are interleaved one by one, so a slow-down of the machine hits both, and timed in process CPU
seconds. It prints parameters, multiply-adds per image (torch.utils.flop_counter), training images
per CPU second and score evaluations (forward passes, no gradient) per CPU second, per round, and
writes them to experiments/results/ncsn_vs_official.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import ncsn  # noqa: E402


def official_side(path, device):
    """(network, one training step of x, one score evaluation of x) from their repository."""
    sys.path.insert(0, str(path))
    import yaml  # their config format; PyYAML comes with their requirements
    from losses.dsm import anneal_dsm_score_estimation
    from models.ema import EMAHelper
    from models.ncsnv2 import NCSNv2

    def namespace(d):
        return argparse.Namespace(**{k: namespace(v) if isinstance(v, dict) else v
                                     for k, v in d.items()})
    config = namespace(yaml.safe_load((Path(path) / "configs" / "cifar10.yml").read_text()))
    config.device = device
    net = NCSNv2(config).to(device)
    o = config.optim
    optimizer = torch.optim.Adam(net.parameters(), lr=o.lr, weight_decay=o.weight_decay,
                                 betas=(o.beta1, 0.999), amsgrad=o.amsgrad, eps=o.eps)
    ema = EMAHelper(mu=config.model.ema_rate)
    ema.register(net)

    def step(x):  # the body of their training loop (runners/ncsn_runner.py)
        loss = anneal_dsm_score_estimation(net, x, net.sigmas, None, config.training.anneal_power)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(net)

    def evaluate(x):
        with torch.no_grad():
            net(x, torch.zeros(len(x), dtype=torch.long, device=device))
    return net, step, evaluate


def our_side(width, device):
    args = ncsn.parse_args(["--width", str(width), "--device", device.type])
    net, ema, optimizer, scaler = ncsn.build(args, device)
    sigmas = ncsn.geometric_sigmas(args.sigma_max, args.sigma_min, args.num_scales).to(device)
    count = [0]

    def step(x):
        ncsn.train_step(net, net, optimizer, scaler, x, sigmas, args, None)
        ncsn.update_ema(ema, net, args.ema, count[0])
        count[0] += 1

    def evaluate(x):
        with torch.no_grad():
            net(x, sigmas[:1].expand(len(x)))
    return net, step, evaluate


def multiply_adds(net, x, label):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x[:1], label[:1])
    return counter.get_total_flops() / 2


def cpu_seconds(fn, x):
    start = time.process_time()
    fn(x)
    return time.process_time() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", type=Path, required=True, help="a clone of ermongroup/ncsnv2")
    p.add_argument("--widths", default="112", help="our widths, comma-separated")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds after a warm-up")
    p.add_argument("--steps", type=int, default=3, help="training steps per side per round")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "experiments/results/ncsn_vs_official.json")
    a = p.parse_args(argv)
    if not (a.official / "models" / "ncsnv2.py").is_file():
        p.error(f"--official {a.official}: not a clone of ermongroup/ncsnv2 (no models/ncsnv2.py)")
    torch.manual_seed(0)
    device = torch.device("cpu")
    sides = {"official NCSNv2 (RefineNet)": official_side(a.official, device)}
    for w in a.widths.split(","):
        sides[f"ncsn.py (U-Net, width {int(w)})"] = our_side(int(w), device)
    x = torch.rand(a.batch_size, 3, 32, 32)
    results = {}
    for name, (net, step, evaluate) in sides.items():
        label = torch.zeros(1, dtype=torch.long) if "official" in name else torch.ones(1)
        results[name] = {"parameters": sum(q.numel() for q in net.parameters()),
                         "multiply_adds": multiply_adds(net, x, label),
                         "train_images_per_cpu_s": [], "evaluations_per_cpu_s": []}
        step(x), evaluate(x)  # warm-up
    for r in range(a.rounds):
        train = {name: 0.0 for name in sides}
        for _ in range(a.steps):  # interleaved: both sides see the same machine
            batch = torch.rand(a.batch_size, 3, 32, 32)
            for name, (_, step, _) in sides.items():
                train[name] += cpu_seconds(step, batch)
        for name, (_, _, evaluate) in sides.items():
            seconds = sum(cpu_seconds(evaluate, x) for _ in range(a.steps))
            results[name]["train_images_per_cpu_s"].append(a.steps * a.batch_size / train[name])
            results[name]["evaluations_per_cpu_s"].append(a.steps * a.batch_size / seconds)
        print(f"round {r + 1}: " + ", ".join(
            f"{n}: {results[n]['train_images_per_cpu_s'][-1]:.2f} images/CPU s" for n in sides))
    results["setup"] = {"threads": torch.get_num_threads(), "batch_size": a.batch_size,
                        "rounds": a.rounds, "steps": a.steps, "torch": torch.__version__}
    print(json.dumps(results, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
