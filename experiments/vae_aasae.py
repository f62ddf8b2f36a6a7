"""VAE against AASAE at equal CPU time: experiments/README.md, "AASAE against the VAE at equal CPU
time". From the repository root ($JPEG: the JPEG copy of CIFAR-10 that experiments/README.md names):

    OMP_NUM_THREADS=1 python -m experiments.vae_aasae --data $JPEG --seeds 1 2
    OMP_NUM_THREADS=1 python -m experiments.vae_aasae --data $JPEG --seeds 1 2 --table-only

For each seed it trains `vae.py` (beta = 1, no augmentation) and `experiments/aasae.py` (beta = 0,
the encoder sees SimCLR views) at the same small width and data, with the number of epochs of each
chosen so that both get about --budget seconds of single-thread CPU time (calibrated from a measured
seconds per training step of each, in this process), two runs at a time. Each run's CPU seconds are
measured (os.wait4) and reported. Then experiments/vae_probe.py on every run (posterior means, a
randomly initialised encoder and raw pixels, each under the same linear probe) and a figure of
reconstructions and samples of both. --table-only skips training and probing: it tabulates the runs
already in --run-dir. Writes experiments/results/vae_aasae.json (epochs, commands, CPU seconds),
experiments/results/vae_aasae.md (the table) and --figure (runs/figures/vae_aasae_grids.png).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import common
import vae
from experiments import aasae

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results" / "vae_aasae"  # .json and .md
SETTING = ["--width", "16", "--blocks", "1", "--latent-channels", "16", "--latent-size", "8",
           "--batch-size", "32", "--lr", "1e-3", "--warmup-steps", "20", "--log-every", "25"]
CONFIGS = {"vae": ["--kl-warmup", "1"], "aasae": aasae.AASAE}  # flags on top of SETTING
PROGRAMS = {"vae": "vae.py", "aasae": "experiments/aasae.py"}
VIEWS = {"vae": None, "aasae": aasae.simclr_view}  # what the encoder sees: x, or a random view
# Falcon et al. 2021, CIFAR-10 linear probe top-1 (%)
PAPER = {"aasae": 87.14, "vae": 57.16, "simclr": 94.00}
FEATURES = ("trained_encoder", "random_encoder", "raw_pixels")  # the probe's feature sets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--data", default="cifar10", help="'cifar10' or an image folder with class folders")
    add("--data-root", default="data", help="where CIFAR-10 and decoded-image caches live")
    add("--run-dir", default="runs/aasae_experiment", help="where the runs go")
    add("--limit-train", type=int, default=4000, help="training images (the probe's too)")
    add("--limit-test", type=int, default=1000, help="test images for the per-epoch bound")
    add("--probe-test", type=int, default=10000, help="test images for the probe")
    add("--budget", type=float, default=600, help="CPU seconds of training per run")
    add("--seeds", type=int, nargs="+", default=[1], help="one VAE and one AASAE run per seed")
    add("--table-only", action="store_true", help="only tabulate the runs already there")
    add("--out", default=str(RESULTS),
        help="path without suffix of the record (.json: epochs, commands, CPU s) and table (.md)")
    add("--figure", default="runs/figures/vae_aasae_grids.png", help="where the grids go")
    return p.parse_args(argv)


def common_flags(args):
    return ["--data", args.data, "--data-root", args.data_root, "--run-dir", args.run_dir,
            "--device", "cpu", "--limit-train", str(args.limit_train), "--limit-test",
            str(args.limit_test), *SETTING]


def shown(command, args):
    """A command as the record shows it: the data folder as $DATA (not where it lies here)."""
    folder = args.data if args.data != "cifar10" else None
    return " ".join("python" if word == sys.executable else "$DATA" if word == folder else word
                    for word in command)


def seconds_per_step(args, config, steps=12):
    """Single-thread CPU seconds of one real training step of a config (after two warm-up
    steps)."""
    torch.set_num_threads(1)
    run_args = vae.parse_args(common_flags(args) + CONFIGS[config])
    torch.manual_seed(0)
    net, _, optimizer, scaler = vae.build(run_args, torch.device("cpu"))
    images = common.load_images(args.data, args.data_root, "train")
    x = images[:run_args.batch_size].float() / 255
    state = {"grad_norm_avg": torch.tensor(math.inf), "clipped_outliers": torch.tensor(0)}
    beta = run_args.kl_weight  # the config's own loss: beta = 0 drops the KL term

    def step():
        vae.train_step(net, net, optimizer, scaler, x, beta, run_args, state, None, VIEWS[config])

    step(), step()
    start = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - start) / steps


def find_run(args, config, seed):
    runs = sorted(Path(args.run_dir).glob(f"vae__aasae-exp-{config}__{seed}__*"))
    return runs[-1] if runs and (runs[-1] / "summary.json").exists() else None


def run_in_parallel(commands, log_dir, record, record_path):
    """Run the commands two at a time (logs in log_dir); each one's CPU seconds (user + system,
    from os.wait4) go into record["cpu_seconds"], written to record_path as each finishes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running = list(commands), {}
    while pending or running:
        while pending and len(running) < 2:
            key, command = pending.pop(0)
            print("$", " ".join(command), flush=True)
            log = open(Path(log_dir) / f"{key}.log", "w")
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            # kept: a Popen collected while running is reaped by the next Popen
            running[proc.pid] = key, proc, log
        pid, status, usage = os.wait4(-1, 0)
        if pid in running:
            key, _, log = running.pop(pid)
            log.close()
            if os.waitstatus_to_exitcode(status) != 0:
                sys.exit(f"{key} failed: see {log_dir}/{key}.log")
            record["cpu_seconds"][key] = usage.ru_utime + usage.ru_stime
            record_path.write_text(json.dumps(record, indent=2) + "\n")
            print(f"{key}: {record['cpu_seconds'][key]:.0f} CPU s", flush=True)


def train_and_probe(args, record, record_path):
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    steps_per_epoch = args.limit_train // 32
    todo = [(c, s) for s in args.seeds for c in CONFIGS if find_run(args, c, s) is None]
    # the epochs of a config, once measured, never change: later seeds get the same
    for config in sorted({c for c, _ in todo} & set(record["epochs"])):
        print(f"{config}: {record['epochs'][config]} epochs, as measured before in {args.out}.json "
              "(--budget applies to a new --out)", flush=True)
    for config in sorted({c for c, _ in todo} - set(record["epochs"])):
        sps = seconds_per_step(args, config)
        record["epochs"][config] = max(1, round(args.budget / (sps * steps_per_epoch)))
        record[f"seconds_per_step_{config}"] = sps
        print(f"{config}: {sps:.3f} CPU s per step -> {record['epochs'][config]} epochs",
              flush=True)
    commands = [(f"{c}-{s}", [sys.executable, PROGRAMS[c], *common_flags(args), *CONFIGS[c],
                              "--name", f"aasae-exp-{c}", "--seed", str(s),
                              "--epochs", str(record["epochs"][c])]) for c, s in todo]
    record["train_commands"].update({key: shown(command, args) for key, command in commands})
    run_in_parallel(commands, args.run_dir, record, record_path)
    # the probe reads the run's own flags (data, limits); the test images are the probe's own
    probes = [(f"probe-{c}-{s}", [sys.executable, "experiments/vae_probe.py",
                                  str(find_run(args, c, s)), "--limit-test", str(args.probe_test)])
              for s in args.seeds for c in CONFIGS
              if not (find_run(args, c, s) / "probe.json").exists()]
    record["probe_commands"].update({key: shown(command, args) for key, command in probes})
    run_in_parallel(probes, args.run_dir, record, record_path)


def grids(args, seed, path, n=10):
    """Test images, both models' reconstructions (decoded posterior means) and prior samples
    (E[x|z], T = 1), from the same z for both models."""
    device = torch.device("cpu")
    from PIL import Image

    test = common.load_images(args.data, args.data_root, "test")[:n].float() / 255
    rows, samples = [("test", test)], []
    for config in CONFIGS:
        run = find_run(args, config, seed)
        net, _ = vae.load_trained(run, vae.parse_args(["--sample", str(run)]), device)
        s = net.latent_size
        z = torch.randn(n, net.latent_channels, s, s, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            mu = net.encode(test * 2 - 1)[0]
            rows.append((f"{config} recon.", vae.decode_images(net, mu, drawn=False)))
        samples.append((f"{config} sample", vae.decode_images(net, z, drawn=False)))
    data = "CIFAR-10" if args.data == "cifar10" else Path(args.data).name
    common.save_rows(rows + samples, path, title=f"{data}, CPU scale: test images, reconstructions "
                     "(decoded posterior means), prior samples (E[x|z], T = 1)")
    image = Image.open(path).convert("RGB")  # 60% of matplotlib's size: under 300 KB per figure
    image.resize((image.width * 3 // 5, image.height * 3 // 5), Image.LANCZOS).save(path,
                                                                                  optimize=True)


def table(args, record):
    """The table of every seed's two runs: epochs, CPU seconds, bound, and the probe's top-1 of each
    feature set with the L2 strength it chose."""
    lines = ["| model | seed | epochs | training CPU s | test bits/dim (ELBO) | probe: trained "
             "encoder | probe: same encoder, random init | probe: raw pixels |", "|" + "---|" * 8]
    for seed in args.seeds:
        for config in CONFIGS:
            run = find_run(args, config, seed)
            if run is None or not (run / "probe.json").exists():
                sys.exit(f"no finished, probed {config} run of seed {seed} in {args.run_dir}")
            summary, probe = (json.loads((run / name).read_text())
                              for name in ("summary.json", "probe.json"))
            bpd = f"{summary['test_bpd']:.3f}" if "test_bpd" in summary else \
                "not reported (beta = 0)"
            top1 = [f"{100 * probe[key]['top1']:.2f}% (l2 {probe[key]['l2']:g})"
                    for key in FEATURES]
            cpu = record["cpu_seconds"].get(f"{config}-{seed}")
            cpu = "not recorded" if cpu is None else f"{cpu:.0f}"
            lines.append(f"| {config} | {seed} | {summary['epochs']} | {cpu} | {bpd} | "
                         + " | ".join(top1) + " |")
    lines.append(f"\nProbe: {probe['n_train']} labelled training images, {probe['n_test']} test "
                 f"images, {len(probe['classes'])} classes (chance {100 * probe['chance']:.0f}%); "
                 "l2: the L2 strength picked on the last tenth of the training set. Paper (Falcon "
                 "et al. 2021, full CIFAR-10, ResNet-50, 3,200 epochs): AASAE "
                 f"{PAPER['aasae']:.2f}%, VAE {PAPER['vae']:.2f}%, SimCLR {PAPER['simclr']:.2f}%.")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    record_path, table_path = Path(args.out + ".json"), Path(args.out + ".md")
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    for key in ("epochs", "cpu_seconds", "train_commands", "probe_commands"):
        record.setdefault(key, {})
    if not args.table_only:
        train_and_probe(args, record, record_path)
    text = table(args, record)
    table_path.write_text(text + "\n")
    print(text)
    grids(args, args.seeds[0], args.figure)
    print(f"wrote {table_path} and {args.figure}")


if __name__ == "__main__":
    main()
