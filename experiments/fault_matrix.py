"""Runs that survive faults: each model file killed at random moments and inside checkpoint saves,
then resumed; and a list of bad inputs, each of which must get one clear line and leave the run
untouched.

    # about 20 CPU minutes
    OMP_NUM_THREADS=1 python -m experiments.fault_matrix --out runs/fault_matrix \\
        --record experiments/results/fault_matrix.json
    # a quick look
    OMP_NUM_THREADS=1 python -m experiments.fault_matrix --out runs/fault_matrix_quick --kills 1

Kills: for each model, a tiny run (width 8, 64 images written here, 3 epochs) is `kill -9`ed --kills
times at a random moment (30-95% of the time an uninterrupted run takes, measured first; a run that
ends before its kill is counted apart, not as survived), --save-kills times inside a checkpoint save
(the save is slowed down by a wrapper so that the kill lands between the temporary file and the
rename), and once as a two-process torchrun. After each kill the run is resumed (or started again,
if the kill came before its first checkpoint) to 3 epochs, and checked: a loadable checkpoint of
epoch 3, each epoch's row once in metrics.jsonl, steps in order, no .tmp left.

Bad inputs: flags out of range (0 where 0 is not "off", an EMA decay of 1.5, negative, nan, text),
an absent --device cuda, unknown flags, --name that is a path; --data missing, a file, empty, or
only unreadable images; --data-root and --run-dir that are files; --resume of a finished run, of a
missing folder, of a folder that is not a run; a network of another width; broken run folders
(truncated, random, empty, pickled-code, foreign, incomplete or non-dict checkpoints; no or damaged
config.json) for --sample and --resume (a second writer of a run folder is tested in
test_models.py). Each must exit non-zero with one line on stderr, no traceback, and leave the run
folder byte for byte as it was. Writes OUT/fault_matrix.json and prints the table.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

TINY = {"ncsn": ["--width", "8", "--channel-mult", "1,2", "--num-res-blocks", "1",
                 "--num-scales", "10", "--steps-per-level", "1", "--limit-test", "16"],
        "vae": ["--width", "8", "--blocks", "1", "--latent-channels", "4", "--mixtures", "3"],
        "ebm": ["--width", "8", "--sgld-steps", "3", "--buffer-size", "64"]}
SLOW_SAVE = """
import sys, time
sys.path.insert(0, {root!r})
import {model} as m
save = m.save_checkpoint
def slow(run_dir, **state):  # the temporary file is written, then a pause before the rename
    import torch
    torch.save({{"model": "half"}}, run_dir / "checkpoint.pt.tmp")
    print("SAVING", flush=True)
    time.sleep(3)
    save(run_dir, **state)
m.save_checkpoint = slow
m.main(sys.argv[1:])
"""


def write_images(folder, n=64):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 16)):
        (folder / split / "a").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                folder / split / "a" / f"{i}.png")


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def command(model, *args, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2"] if torchrun else [sys.executable]
    return [*launcher, str(ROOT / f"{model}.py"), *map(str, args)]


def check(run, epochs=3):
    """(ok, why): a loadable checkpoint of `epochs` epochs, each epoch logged once, steps in order,
    no .tmp."""
    try:
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    except Exception as e:
        return False, f"checkpoint: {type(e).__name__}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["epoch"] for r in rows if "epoch_seconds" in r]
    steps = [r["step"] for r in rows]
    if ckpt["epoch"] != epochs or logged != list(range(1, epochs + 1)) or steps != sorted(steps):
        return False, f"epoch {ckpt['epoch']}, logged {logged}"
    return (not list(run.glob("*.tmp"))), "a .tmp was left"


def tiny_run(model, base, out, name):
    return [*base, "--run-dir", out / "runs" / name, "--name", name, *TINY[model],
            "--batch-size", 16, "--epochs", 3]


def seconds_to_finish(model, base, out, torchrun=False):
    """Wall seconds of one uninterrupted tiny run, start-up included: the random kills land
    inside it."""
    start = time.perf_counter()
    name = f"{model}-whole-{'torchrun' if torchrun else 'one'}"
    subprocess.run(command(model, *tiny_run(model, base, out, name), torchrun=torchrun),
                   capture_output=True, check=True, timeout=900)
    return time.perf_counter() - start


def process_tree(pid):
    """pid and every process below it, from the parent ids in /proc (Linux)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def saved_epoch(run):
    try:
        return torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    except Exception:  # absent or cut short by the kill: the resume below must cope
        return None


def last_line(log):
    """The last line a child process wrote to its log file: why it failed."""
    return (Path(log).read_text(errors="replace").strip().splitlines() or ["no output"])[-1]


def kill_and_resume(model, base, out, name, when, torchrun=False, seconds=10.0):
    """Train, kill -9 at `when` ('save', or 'random': a moment in the first 30-95% of `seconds`),
    resume to 3 epochs; the check's (ok, why), or None when the run ended before the kill."""
    runs, log = out / "runs" / name, out / f"{name}.log"  # log: the child's stderr
    args = tiny_run(model, base, out, name)
    if when == "save":
        script = out / f"slow_{model}.py"
        script.write_text(SLOW_SAVE.format(root=str(ROOT), model=model))
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, str(script), *map(str, args)],
                                    stdout=subprocess.PIPE, stderr=err, text=True,
                                    start_new_session=True)
        for line in proc.stdout:  # kill it while a save is half done
            if "SAVING" in line:
                break
    else:
        with open(log, "w") as err:
            proc = subprocess.Popen(command(model, *args, torchrun=torchrun),
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        time.sleep(random.uniform(0.3, 0.95) * seconds)
    if proc.poll() is not None:  # it ended before the kill: counted apart, unless it failed
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed before its kill (exit {proc.returncode}): "
                               f"{last_line(log)}")
        return None
    for pid in process_tree(proc.pid):  # torchrun's workers too: they have sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    folders = list(runs.glob(f"{model}__*")) if runs.exists() else []
    if folders and saved_epoch(folders[0]) == 3:  # killed after its last save, while exiting
        return check(folders[0])
    if folders and (folders[0] / "checkpoint.pt").exists():
        again = command(model, "--resume", folders[0], "--epochs", 3, torchrun=torchrun)
    else:  # killed before its first checkpoint: nothing to resume, so it starts again
        shutil.rmtree(runs, ignore_errors=True)
        again = command(model, *args, torchrun=torchrun)
    subprocess.run(again, capture_output=True, check=True, timeout=900)
    return check(next(runs.glob(f"{model}__*")))


def bad_inputs(model, base, out):
    """(cases that failed cleanly, all cases, the ones that did not) for one model."""
    subprocess.run(command(model, *base, "--run-dir", out / "bad" / model, *TINY[model],
                           "--batch-size", 16, "--epochs", 1), capture_output=True, check=True)
    run = next((out / "bad" / model).glob(f"{model}__*"))
    broken = out / "broken" / model
    payloads = {"cut": (run / "checkpoint.pt").read_bytes()[:500], "random": os.urandom(4000),
                "empty": b""}
    for name, data in payloads.items():
        (broken / name).mkdir(parents=True, exist_ok=True)
        (broken / name / "config.json").write_bytes((run / "config.json").read_bytes())
        (broken / name / "checkpoint.pt").write_bytes(data)
    for name, ckpt in (("code", {"model": model, "x": Path("x")}), ("foreign", {"model": "other"}),
                       ("partial", {"model": model, "net": {}}), ("list", [1, 2])):
        (broken / name).mkdir(parents=True, exist_ok=True)
        (broken / name / "config.json").write_bytes((run / "config.json").read_bytes())
        torch.save(ckpt, broken / name / "checkpoint.pt")
    (broken / "noconfig").mkdir(parents=True, exist_ok=True)
    (broken / "badconfig").mkdir(parents=True, exist_ok=True)
    (broken / "badconfig" / "config.json").write_text("{not json")
    (out / "a_file").write_text("x")
    (out / "empty_dir").mkdir(exist_ok=True)
    (out / "junk" / "train").mkdir(parents=True, exist_ok=True)
    (out / "junk" / "train" / "0.png").write_bytes(b"not a png")
    fresh = [*base, "--run-dir", out / "fresh" / model, *TINY[model], "--epochs", 1]
    off_at_zero = {"--ema": ("1.5",), "--grad-clip": ()}  # 0 is valid for these: off
    cases = [[*fresh, flag, value] for flag in ("--epochs", "--batch-size", "--lr", "--ema",
                                                "--limit-train", "--log-every", "--grad-clip",
                                                "--max-bad-steps")
             for value in (*off_at_zero.get(flag, ("0",)), "-1", "nan", "abc")]
    cases += [[*fresh, "--device", "cuda"] if not torch.cuda.is_available()
              else [*fresh, "--device", "tpu"],
              [*fresh, "--no-such-flag"], [*fresh, "--name", "a/b"], [*fresh, "--name", "../../x"],
              [*fresh, "--data", out / "missing"], [*fresh, "--data", out / "a_file"],
              [*fresh, "--data", out / "empty_dir"], [*fresh, "--data", out / "junk"],
              [*fresh, "--data-root", out / "a_file"], [*fresh, "--run-dir", out / "a_file"],
              ["--resume", run, "--epochs", 1], ["--resume", out / "missing", "--epochs", 2],
              ["--resume", out / "empty_dir", "--epochs", 2], ["--sample", run, "--width", 16]]
    cases += [[command_flag, broken / name]
              + (["--epochs", 5] if command_flag == "--resume" else [])
              for command_flag in ("--sample", "--resume")
              for name in sorted(p.name for p in broken.iterdir())]
    before, failed = digest(run), []
    for case in cases:
        proc = subprocess.run(command(model, *case), capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        if proc.returncode == 0 or len(lines) != 1 or "Traceback" in proc.stderr:
            failed.append(" ".join(map(str, case[-3:]))
                          + f" -> exit {proc.returncode}: {lines[-1:]}")
    untouched = digest(run) == before and not (out / "fresh" / model).exists()
    return len(cases) - len(failed) if untouched else 0, len(cases), failed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/fault_matrix",
                   help="where the tiny runs and the record go")
    p.add_argument("--kills", type=int, default=4, help="kills at a random moment, per model")
    p.add_argument("--save-kills", type=int, default=3,
                   help="kills inside a checkpoint save, per model")
    p.add_argument("--seed", type=int, default=0, help="of the random kill times")
    p.add_argument("--record", help="also write the record here (experiments/results/...)")
    cli = p.parse_args(argv)
    random.seed(cli.seed)
    out = Path(cli.out).resolve()
    write_images(out / "images")
    base = ["--data", out / "images", "--data-root", out / "data", "--device", "cpu",
            "--log-every", 1]
    record = {}
    for model in TINY:
        kills = ([("random", False)] * cli.kills + [("save", False)] * cli.save_kills
                 + [("random", True)])
        seconds = {t: seconds_to_finish(model, base, out, t) for t in (False, True)}
        outcomes = [kill_and_resume(model, base, out, f"{model}-{i}", when, t, seconds[t])
                    for i, (when, t) in enumerate(kills)]
        results = [r for r in outcomes if r is not None]
        clean, total, failed = bad_inputs(model, base, out)
        record[model] = {"kills_survived": sum(ok for ok, _ in results), "kills": len(results),
                         "ended_before_the_kill": len(outcomes) - len(results),
                         "kill_failures": [why for ok, why in results if not ok],
                         "bad_inputs_clean": clean, "bad_inputs": total,
                         "bad_input_failures": failed}
        print(json.dumps({model: record[model]}), flush=True)
    (out / "fault_matrix.json").write_text(json.dumps(record, indent=2))
    if cli.record:
        Path(cli.record).write_text(json.dumps(record, indent=2))
    print("| | kills survived | runs that ended before their kill | bad inputs answered in one line"
          ", exit 1 or 2, run untouched |\n|---|---|---|---|")
    for model, r in record.items():
        print(f"| `{model}.py` | {r['kills_survived']} of {r['kills']} | "
              f"{r['ended_before_the_kill']} | {r['bad_inputs_clean']} of {r['bad_inputs']} |")
    return record


if __name__ == "__main__":
    main()
