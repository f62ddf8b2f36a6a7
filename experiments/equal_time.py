"""The three models side by side after the same CPU time: experiments/README.md's "Side by side".

    OMP_NUM_THREADS=1 python -m experiments.equal_time train --budget 1200   # 2 runs at a time
    OMP_NUM_THREADS=1 python -m experiments.equal_time likelihood            # test bits/dim
    python experiments/compare.py runs/ncsn__equal-time__* runs/vae__equal-time__* \\
        runs/ebm__equal-time__*                                               # the table and figure

Each model trains at its laptop size on the JPEG copy of CIFAR-10 (the environment variable JPEG,
or the real CIFAR-10) for about --budget CPU seconds of one thread: `train` measures each
model's CPU seconds per training step in this process (its own build and train_step, as
experiments/bench.py does), gives it the whole epochs that fill the budget, runs the three scripts
(OMP_NUM_THREADS=1) and records the CPU seconds each really used (its rusage: evaluation and
previews included) in experiments/results/equal_time.json. `likelihood` runs
experiments/likelihood.py on each run (the same --n test images for all three) and records its
CPU seconds too (the defaults, 100 images, IWAE K = 1000 and AIS 1000 x 100, took 1,988 CPU s of
one thread). A quick look writes its own record: `train --budget 60 --record runs/quick.json`, then
`likelihood --n 2 --iw-samples 10 --ais-steps 10 --chains 4 --record runs/quick.json` (its runs are
named equal-time too: move them out of runs/ before compare.py). NCSN uses
the laptop recipe of experiments/ncsn_laptop.py. A child that fails prints its last line and leaves
its whole output in runs/equal-time_*.log.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from experiments import bench  # noqa: E402
from experiments.fault_matrix import last_line  # noqa: E402

RECORD = ROOT / "experiments" / "results" / "equal_time.json"
JPEG = os.environ.get("JPEG", "cifar10")  # an image-folder copy, or the real CIFAR-10
DATA = ["--data", JPEG, "--data-root", str(ROOT / "data"), "--device", "cpu", "--limit-test", "500",
        "--name", "equal-time"]
CONFIGS = {  # model -> (flags, training images)
    "ncsn": (["--width", "32", "--channel-mult", "1,2,2", "--num-res-blocks", "1", "--batch-size",
              "64", "--lr", "1e-3", "--ema", "0.99", "--sigma-max", "5", "--num-scales", "100",
              "--log-every", "20"], 6400),
    "vae": (["--width", "16", "--blocks", "1", "--latent-channels", "16", "--batch-size", "32",
             "--lr", "1e-3", "--warmup-steps", "20", "--kl-warmup", "1", "--log-every", "20"],
            8000),
    "ebm": (["--width", "16", "--sgld-steps", "20", "--batch-size", "64", "--lr", "1e-3",
             "--log-every", "20"], 6400),
}


def cpu_seconds_per_step(model, steps=3):
    """Process CPU seconds of one training step, on random images of the run's batch size."""
    flags, _ = CONFIGS[model]
    module = bench.MODELS[model]
    args = module.parse_args([*DATA, *flags])
    args.memory_format = None  # bench.steps' A/B switch: the model file's own layout
    torch.manual_seed(0)
    train_step, _, _, _ = bench.steps(model, module, args, torch.device("cpu"), None)
    train_step()  # warm-up
    start = time.process_time()
    for _ in range(steps):
        train_step()
    return (time.process_time() - start) / steps, args.batch_size


def launch(cmd, log):
    """`python cmd` in a child process on one thread; what it prints goes to the file log."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def exit_code(status, log):
    """A child's exit code from os.wait4's status; if it failed, its last line (the reason)."""
    code = os.waitstatus_to_exitcode(status)
    if code:
        print(f"failed (exit {code}): {last_line(log)} (all of it: {log})", file=sys.stderr,
              flush=True)
    return code


def shown(cmd):
    """A command as the record shows it: $JPEG for the data folder, paths from the repository."""
    text = "OMP_NUM_THREADS=1 python " + " ".join(map(str, cmd))
    text = text.replace(JPEG, "$JPEG") if "JPEG" in os.environ else text
    return text.replace(str(ROOT) + "/", "")


def run_children(jobs, parallel, where):
    """Each job (key, command, log file, glob of its run folder under runs/, {more to record}) as a
    child, `parallel` at a time. As each ends, the record in the JSON file `where` (kept, if there
    is one) gets under key its run folder, exit status, its own CPU seconds (os.wait4's rusage:
    evaluation and previews included), wall seconds and command. Each Popen stays in `running`
    until its child is reaped: one collected while its child runs is reaped by the next Popen, and
    os.wait4 would never see that child."""
    jobs, running = list(jobs), {}
    record = json.loads(where.read_text()) if where.exists() else {}
    while jobs or running:
        while jobs and len(running) < parallel:
            key, cmd, log, pattern, more = jobs.pop(0)
            before = set((ROOT / "runs").glob(pattern))
            proc = launch(cmd, log)
            running[proc.pid] = (proc, key, cmd, log, pattern, more, before, time.time())
            print(f"started {key}: {more['epochs']} epochs", flush=True)
        pid, status, usage = os.wait4(-1, 0)
        _, key, cmd, log, pattern, more, before, start = running.pop(pid)
        status = exit_code(status, log)
        run = sorted(set((ROOT / "runs").glob(pattern)) - before)
        record[key] = {"run": str(run[-1].relative_to(ROOT)) if run else None,
                       "exit_status": status, **more,
                       "cpu_seconds": usage.ru_utime + usage.ru_stime,
                       "wall_seconds": time.time() - start, "command": shown(cmd)}
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text(json.dumps(record, indent=2))
        print(f"finished {key}: exit {status}, {record[key]['cpu_seconds']:.0f} CPU s, "
              f"{record[key]['wall_seconds']:.0f} s wall", flush=True)


def train(budget, parallel, where):
    torch.set_num_threads(1)
    jobs = []
    for model, (flags, images) in CONFIGS.items():
        per_step, batch = cpu_seconds_per_step(model)
        epochs = max(1, round(budget / (per_step * (images // batch))))
        cmd = [f"{model}.py", *DATA, *flags, "--limit-train", str(images), "--epochs", str(epochs)]
        log = ROOT / "runs" / f"equal-time_{model}.log"
        jobs.append((model, cmd, log, f"{model}__equal-time__*",
                     {"epochs": epochs, "cpu_seconds_per_step": per_step}))
    run_children(jobs, parallel, where)


def likelihood(n, iw_samples, ais_steps, chains, where):
    record = json.loads(where.read_text())
    asked = {"ncsn": [], "vae": ["--iw-samples", iw_samples],
             "ebm": ["--ais-steps", ais_steps, "--chains", chains]}
    for model in CONFIGS:
        if not record.get(model, {}).get("run"):
            print(f"{model}: no finished run in the record (train first)", file=sys.stderr)
            continue
        cmd = ["-m", "experiments.likelihood", model, record[model]["run"], "--n", n,
               "--device", "cpu", *asked[model]]
        log = ROOT / "runs" / f"equal-time_{model}_likelihood.log"
        proc = launch(cmd, log)
        _, status, usage = os.wait4(proc.pid, 0)
        status = exit_code(status, log)
        if status:
            continue
        row = json.loads((ROOT / record[model]["run"] / "likelihood.json").read_text())
        record[model]["likelihood"] = {**row, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                                       "exit_status": status, "command": shown(cmd)}
        where.write_text(json.dumps(record, indent=2))
        print(f"{model}: {row['bits_per_dim']:.3f} bits/dim ({row['method']})", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the three models for the same CPU time")
    t.add_argument("--budget", type=float, default=1200, help="CPU seconds of one thread per run")
    t.add_argument("--parallel", type=int, default=2, help="runs at a time")
    lik = sub.add_parser("likelihood", help="test bits/dim of each run (experiments/likelihood.py)")
    lik.add_argument("--n", type=int, default=100, help="test images (the same for all three)")
    lik.add_argument("--iw-samples", type=int, default=1000, help="the VAE's IWAE K")
    lik.add_argument("--ais-steps", type=int, default=1000, help="the EBM's AIS steps")
    lik.add_argument("--chains", type=int, default=100, help="the EBM's AIS chains per repeat")
    for command in (t, lik):
        command.add_argument("--record", type=Path, default=RECORD,
                             help="the record read and written (a quick look: a file of its own)")
    args = p.parse_args(argv)
    if args.command == "train":
        train(args.budget, args.parallel, args.record)
    else:
        likelihood(args.n, args.iw_samples, args.ais_steps, args.chains, args.record)


if __name__ == "__main__":
    main()
