"""VAE against AASAE at equal CPU time: README's table "AASAE against the VAE: linear probe at equal CPU time".

    OMP_NUM_THREADS=1 python -m experiments.vae_aasae --data ../shared/data/cifar10-jpeg --data-root data
    OMP_NUM_THREADS=1 python -m experiments.vae_aasae --table-only       # re-tabulate what is already there

For each seed it trains `vae.py` (beta = 1, no augmentation) and `vae.py --preset aasae` (beta = 0, the
encoder sees SimCLR views) at the same small width and data, with the number of epochs of each chosen so
that both get about --budget seconds of single-thread CPU time (calibrated from a measured seconds per
training step of each, in this process), two runs at a time. Each run's CPU seconds are measured (os.wait4)
and reported. Then `vae.py --probe` on every run (posterior means, a randomly initialised encoder and raw
pixels, each under the same linear probe) and a figure of reconstructions and samples of both.
Writes RUN_DIR/table.md, RUN_DIR/experiment.json and --figure (runs/figures/vae_aasae_grids.png).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import common
import vae

ROOT = Path(__file__).resolve().parent.parent
SETTING = ["--width", "16", "--blocks", "1", "--latent-channels", "16", "--latent-size", "8", "--batch-size", "32",
           "--lr", "1e-3", "--warmup-steps", "20", "--log-every", "25"]
CONFIGS = {"vae": ["--preset", "vae", "--kl-warmup", "1"], "aasae": ["--preset", "aasae"]}
PAPER = {"aasae": 87.14, "vae": 57.16, "simclr": 94.00}  # Falcon et al. 2021, CIFAR-10 linear probe top-1 (%)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/cifar10-jpeg", help="an ImageFolder tree with class folders")
    p.add_argument("--data-root", default="data", help="decoded-image caches")
    p.add_argument("--run-dir", default="runs/aasae_experiment", help="where the runs and the table go")
    p.add_argument("--limit-train", type=int, default=4000, help="training images (the probe's too)")
    p.add_argument("--limit-test", type=int, default=1000, help="test images for the per-epoch bound")
    p.add_argument("--probe-test", type=int, default=10000, help="test images for the probe")
    p.add_argument("--budget", type=float, default=600, help="CPU seconds of training per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="one VAE and one AASAE run per seed")
    p.add_argument("--table-only", action="store_true", help="only tabulate the runs already there")
    p.add_argument("--figure", default="runs/figures/vae_aasae_grids.png", help="where the grids go")
    return p.parse_args(argv)


def common_flags(args):
    return ["--data", args.data, "--data-root", args.data_root, "--run-dir", args.run_dir, "--device", "cpu",
            "--limit-train", str(args.limit_train), "--limit-test", str(args.limit_test), *SETTING]


def seconds_per_step(args, config, steps=12):
    """Single-thread CPU seconds of one real training step of a config (after two warm-up steps)."""
    torch.set_num_threads(1)
    run_args = vae.parse_args(common_flags(args) + CONFIGS[config])
    torch.manual_seed(0)
    net, _, optimizer, scaler = vae.build(run_args, torch.device("cpu"))
    x = common.load_images(args.data, args.data_root, "train")[:run_args.batch_size].float() / 255
    state = {}
    step = lambda: vae.train_step(net, net, optimizer, scaler, x, 1.0, run_args, state, None)  # noqa: E731
    step(), step()
    start = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - start) / steps


def find_run(args, config, seed):
    runs = sorted(Path(args.run_dir).glob(f"vae__aasae-exp-{config}__{seed}__*"))
    return runs[-1] if runs and (runs[-1] / "summary.json").exists() else None


def run_in_parallel(commands, log_dir, record, record_path):
    """Run the commands two at a time (logs in log_dir); each one's CPU seconds (user + system, from os.wait4) go
    into record["cpu_seconds"], written to record_path as each finishes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running = list(commands), {}
    while pending or running:
        while pending and len(running) < 2:
            key, command = pending.pop(0)
            print("$", " ".join(command), flush=True)
            log = open(Path(log_dir) / f"{key}.log", "w")
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[proc.pid] = key, proc  # kept: a Popen collected while running is reaped by the next Popen
        pid, status, usage = os.wait4(-1, 0)
        if pid in running:
            key, _ = running.pop(pid)
            if os.waitstatus_to_exitcode(status) != 0:
                sys.exit(f"{key} failed: see {log_dir}/{key}.log")
            record["cpu_seconds"][key] = usage.ru_utime + usage.ru_stime
            record_path.write_text(json.dumps(record, indent=2))
            print(f"{key}: {record['cpu_seconds'][key]:.0f} CPU s", flush=True)


def train_and_probe(args):
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    record_path = Path(args.run_dir) / "experiment.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"cpu_seconds": {}, "epochs": {}}
    steps_per_epoch = args.limit_train // 32
    todo = [(c, s) for s in args.seeds for c in CONFIGS if find_run(args, c, s) is None]
    for config in sorted({c for c, _ in todo} - set(record["epochs"])):  # the epochs of a config never change
        sps = seconds_per_step(args, config)
        record["epochs"][config] = max(1, round(args.budget / (sps * steps_per_epoch)))
        record[f"seconds_per_step_{config}"] = sps
        print(f"{config}: {sps:.3f} CPU s per step -> {record['epochs'][config]} epochs", flush=True)
    commands = [(f"{c}-{s}", [sys.executable, "vae.py", *common_flags(args), *CONFIGS[c], "--name", f"aasae-exp-{c}",
                              "--seed", str(s), "--epochs", str(record["epochs"][c])]) for c, s in todo]
    record.setdefault("train_commands", {}).update({key: " ".join(command[1:]) for key, command in commands})
    run_in_parallel(commands, args.run_dir, record, record_path)
    probes = [(f"probe-{c}-{s}", [sys.executable, "vae.py", "--probe", str(find_run(args, c, s)), "--limit-test",
                                  str(args.probe_test)])
              for s in args.seeds for c in CONFIGS if not (find_run(args, c, s) / "probe.json").exists()]
    run_in_parallel(probes, args.run_dir, record, record_path)


def grids(args, seed, path, n=10):
    """Test images, both models' reconstructions (decoded posterior means) and prior samples (E[x|z], T = 1)."""
    device = torch.device("cpu")
    from PIL import Image

    test = common.load_images(args.data, args.data_root, "test")[:n].float() / 255
    rows = [("test", test)]
    samples = []
    for config in CONFIGS:
        run = find_run(args, config, seed)
        net = vae.load_trained(run, vae.parse_args(["--sample", str(run)]), device)
        with torch.no_grad():
            rows.append((f"{config} recon.", vae.decode_images(net, net.encode(test * 2 - 1)[0])))
        samples.append((f"{config} sample", vae.decode_images(net, vae.prior_noise(net, n, 1.0, seed, device))))
    common.save_rows(rows + samples, path, title="JPEG copy, CPU scale: test images, reconstructions (decoded "
                     "posterior means), prior samples (E[x|z], T = 1)")
    image = Image.open(path).convert("RGB")  # 60% of matplotlib's size: under README's 300 KB per figure
    image.resize((image.width * 3 // 5, image.height * 3 // 5), Image.LANCZOS).save(path, optimize=True)


def table(args):
    record = json.loads((Path(args.run_dir) / "experiment.json").read_text())
    lines = ["| model | seed | epochs | training CPU s | test bits/dim (ELBO) | probe: trained encoder | "
             "probe: same encoder, random init | probe: raw pixels |", "|" + "---|" * 8]
    for seed in args.seeds:
        for config in CONFIGS:
            run = find_run(args, config, seed)
            summary, probe = (json.loads((run / name).read_text()) for name in ("summary.json", "probe.json"))
            bpd = f"{summary['final_test_bpd']:.3f}" if "final_test_bpd" in summary else "not reported (beta = 0)"
            top1 = [f"{100 * probe[key]['top1']:.2f}%" for key in ("trained_encoder", "random_encoder", "raw_pixels")]
            cpu = record["cpu_seconds"].get(f"{config}-{seed}")
            cpu = "not recorded" if cpu is None else f"{cpu:.0f}"
            lines.append(f"| {config} | {seed} | {summary['epochs']} | {cpu} | {bpd} | " + " | ".join(top1) + " |")
    lines.append(f"\nProbe: {probe['n_train']} labelled training images, {probe['n_test']} test images, "
                 f"{len(probe['classes'])} classes (chance {100 * probe['chance']:.0f}%). Paper (Falcon et al. 2021, "
                 f"full CIFAR-10, ResNet-50, 3,200 epochs): AASAE {PAPER['aasae']}%, VAE {PAPER['vae']}%, "
                 f"SimCLR {PAPER['simclr']}%.")
    text = "\n".join(lines)
    (Path(args.run_dir) / "table.md").write_text(text + "\n")
    print(text)


def main(argv=None):
    args = parse_args(argv)
    if not args.table_only:
        train_and_probe(args)
    table(args)
    grids(args, args.seeds[0], args.figure)
    print(f"wrote {args.run_dir}/table.md and {args.figure}")


if __name__ == "__main__":
    main()
