"""Finished two-process torchrun jobs that still fail at exit: experiments/README.md's "A finished
torchrun job that aborted at exit".

    OMP_NUM_THREADS=1 python -m experiments.torchrun_exit ebm --rounds 12 --jobs 4
    OMP_NUM_THREADS=1 python -m experiments.torchrun_exit ebm --rounds 12 --jobs 4 --root OLD

First one job of the model file runs through a wrapper that ends as its __main__ does (main,
then destroy_process_group) and prints how many of gloo's threads each process still has (Linux:
it reads /proc). Then each round starts --jobs tiny torchrun jobs at once (2 and 1 epochs in turn,
2 processes each, on 64 images written here) and counts the jobs that exit non-zero and, among
them, those that aborted after their work ("terminate called without an active exception").
--root runs the model file of another checkout (a git worktree of an older commit): run both at
once to share the load.
"""

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from experiments.fault_matrix import ROOT, TINY, write_images

THREADS_LEFT = """
import sys
sys.path.insert(0, {here!r})
from experiments.torchrun_exit import gloo_threads_left
sys.path.insert(0, sys.argv[1])  # the model file of --root, and its common.py
import torch.distributed as dist
import {model} as module
module.main(sys.argv[2:])
dist.destroy_process_group()
print(f"gloo threads left: {{gloo_threads_left()}}")
"""


def gloo_threads_left():
    """How many of gloo's threads this process still has (Linux's /proc names them; 0 elsewhere).
    The torchrun test counts them with this too."""
    return sum("gloo" in comm.read_text() for comm in Path("/proc/self/task").glob("*/comm"))


def torchrun(args, out, name, epochs, wrapper=None):
    script = [str(wrapper), str(args.root)] if wrapper else [str(args.root / f"{args.model}.py")]
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *script, "--data", str(out / "images"), "--data-root", str(out / "data"), "--run-dir",
         str(out / name), "--device", "cpu", *TINY[args.model], "--batch-size", "16", "--epochs",
         str(epochs)], env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=sorted(TINY))
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--jobs", type=int, default=4, help="torchrun jobs at once in a round")
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout whose model file runs")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "torchrun_exit")
    args = p.parse_args(argv)
    out = args.out / args.model / args.root.resolve().name
    shutil.rmtree(out, ignore_errors=True)
    write_images(out / "images")
    (out / "threads_left.py").write_text(THREADS_LEFT.format(here=str(ROOT), model=args.model))
    stdout, _ = torchrun(args, out, "threads", 1, out / "threads_left.py").communicate(timeout=600)
    print(" / ".join(line for line in stdout.splitlines() if "threads left" in line), flush=True)
    failed, aborted = 0, 0
    for i in range(args.rounds):
        jobs = [torchrun(args, out, f"round{i}-{j}", 2 - j % 2) for j in range(args.jobs)]
        for job in jobs:
            _, err = job.communicate(timeout=1200)
            failed += job.returncode != 0
            aborted += job.returncode != 0 and "terminate called without an active" in err
        for j in range(args.jobs):
            shutil.rmtree(out / f"round{i}-{j}")
        print(f"{args.jobs * (i + 1)} jobs: {failed} failed, {aborted} of them aborted at exit",
              flush=True)
    print(f"{args.model}.py of {args.root.resolve()}: {failed} of {args.jobs * args.rounds} jobs "
          f"failed, {aborted} aborted at exit")


if __name__ == "__main__":
    main()
