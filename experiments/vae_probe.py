"""How much of the labels a VAE's code makes linearly readable: the linear probe of AASAE's paper.

    # RUN/probe.json
    python -m experiments.vae_probe runs/RUN
    # (the run's flags are its defaults)
    python -m experiments.vae_probe runs/RUN --limit-train 4000

Freeze the encoder (the run's EMA weights), take the posterior means E_q[z|x] of the training images
as features, standardise them and fit a multinomial logistic regression (measures.linear_probe:
full-batch L-BFGS to a stated tolerance, the L2 strength picked on the last tenth of the training
set); report top-1 on the test images. The same protocol runs on two baselines: the same encoder at
its random initialisation (the run's own initial weights) and raw pixels, so the table shows what
training added. This is the only place where labels are read (class folders, or CIFAR-10's targets):
no model sees one in training.
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the model files are scripts at the top of the repository

import torch  # noqa: E402

import common  # noqa: E402
import vae  # noqa: E402
from experiments import measures  # noqa: E402


@torch.inference_mode()
def posterior_means(net, images, args, device, dtype):
    """E_q[z|x] of uint8 images (N, 3, 32, 32), flattened to (N, C s s) float32 on the device."""
    out = []
    for start in range(0, len(images), args.batch_size):
        x = images[start:start + args.batch_size].to(device).float() / 127.5 - 1
        with vae.autocast(device, dtype):
            out.append(net.encode(x)[0].flatten(1).float())
    return torch.cat(out)


def probe(argv):
    """RUN/probe.json: top-1 of the trained encoder, the same encoder untrained, and raw pixels."""
    args = vae.parse_args(["--sample", argv[0], *argv[1:]])  # the run's flags, as vae.py reads them
    device, _, _ = vae.setup_device(args)
    dtype, start = vae.amp_dtype(args, device), time.perf_counter()
    splits = [common.load_split(args.data, args.data_root, split) for split in ("train", "test")]
    (train_x, train_y), (test_x, test_y) = (
        (d["images"][:limit], d["labels"][:limit].to(device))
        for d, limit in zip(splits, (args.limit_train, args.limit_test)))
    classes = splits[0]["classes"]
    if len(classes) < 2 or (train_y < 0).any() or (test_y < 0).any():
        raise common.UserError(f"the probe needs labels: --data {args.data} must hold "
                               "train/<class>/ and test/<class>/ folders (two classes at least)")
    trained, _ = vae.load_trained(args.sample, args, device)
    torch.manual_seed(args.seed)  # as train() seeds it: the run's own initial weights
    untrained = vae.build(args, device)[0].eval()
    encoders = {"trained_encoder": lambda x: posterior_means(trained, x, args, device, dtype),
                "random_encoder": lambda x: posterior_means(untrained, x, args, device, dtype),
                "raw_pixels": lambda x: x.flatten(1).to(device).float() / 127.5 - 1}
    result = {"n_train": len(train_x), "n_test": len(test_x), "classes": classes,
              "chance": 1 / len(classes)}
    for name, features in encoders.items():
        result[name] = measures.linear_probe(features(train_x), train_y, features(test_x), test_y,
                                           len(classes))
        print(f"{name:16} top-1 {100 * result[name]['top1']:.2f}% (l2 {result[name]['l2']:g}; "
              f"{result[name]['evaluations']} L-BFGS evaluations, largest gradient entry "
              f"{result[name]['grad_max']:.1e})")
    result["seconds"] = time.perf_counter() - start
    (Path(args.sample) / "probe.json").write_text(json.dumps(result, indent=2))
    print(f"chance {100 / len(classes):.1f}%; written to {args.sample}/probe.json")
    return result


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python experiments/vae_probe.py RUN [vae.py flags]")
    try:
        probe(sys.argv[1:])
    except common.UserError as e:
        sys.exit(f"vae_probe: error: {e}")
