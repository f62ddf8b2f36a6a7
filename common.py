"""What vae.py, ebm.py and ncsn.py share: data loading, metrics and image grids. Nothing else.

Everything about a model, including how it is trained, checkpointed and resumed, lives in that
model's file. This file only moves pixels and numbers, so that the three models see the same data
and are measured the same way.

    python common.py explore    --data ../shared/data/cifar10-jpeg   # figures + numbers of the data
    python common.py bench-data --data ../shared/data/cifar10-jpeg   # our loader vs a DataLoader
    python common.py compare runs/A runs/B ...                        # one table for several runs
"""

import argparse
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

IMAGE_DIMS = 3 * 32 * 32  # one CIFAR-10 image: the D in bits per dimension
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class UserError(Exception):
    """A problem with the user's input. The scripts print it as one line and exit with status 1."""


def positive_int(text):  # argparse types, shared by every script's command line
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return int(text)


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


# ----------------------------------------------------------------------------------------------
# Data: any source becomes one uint8 tensor (N, 3, 32, 32), decoded once and cached
# ----------------------------------------------------------------------------------------------

def _to_32x32(path):
    """Decode one image file to a (32, 32, 3) uint8 array: RGB, shorter side 32, centre crop."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode.startswith("I") or img.mode == "F":  # 16-bit/float greyscale: PIL's convert would clip
            arr = np.asarray(img, dtype=np.float64)
            top = 255 if arr.max() <= 255 else 65535 if img.mode.startswith("I") else arr.max()
            img = Image.fromarray((arr / top * 255).round().clip(0, 255).astype(np.uint8))
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA", "LA") else img.convert("RGB")
        if img.size != (32, 32):
            w, h = img.size
            scale = 32 / min(w, h)
            img = img.resize((max(32, round(w * scale)), max(32, round(h * scale))), Image.BICUBIC)
            w, h = img.size
            left, top = (w - 32) // 2, (h - 32) // 2
            img = img.crop((left, top, left + 32, top + 32))
        return np.asarray(img, dtype=np.uint8)


def _image_files(folder):
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _folder_split(path, split):
    """The files of one split: `train/` and `test/` subfolders if present, else a seeded 5% hold-out."""
    root = Path(path)
    if not root.is_dir():
        what = "a file, not a folder" if root.exists() else "no such folder"
        raise UserError(f"--data {path}: {what} (give a folder of images, or 'cifar10')")
    if (root / "train").is_dir() and (root / "test").is_dir():
        base, files = root / split, _image_files(root / split)
    else:
        base, files = root, _image_files(root)
        if len(files) >= 2:  # the split never depends on the run's seed: test images stay test images
            order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
            n_test = max(1, round(0.05 * len(files)))
            keep = sorted(order[:n_test] if split == "test" else order[n_test:])
            files = [files[i] for i in keep]
    if not files:
        raise UserError(f"--data {path}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {base}")
    return base, files


def data_key(data, split):
    """A short name that changes whenever the split's files do (names, sizes, modification times)."""
    if data == "cifar10":
        return f"cifar10-{split}"
    base, files = _folder_split(data, split)
    h = hashlib.sha1(str(base.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(base)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return f"{Path(data).resolve().name}-{split}-{h.hexdigest()[:12]}-v3"  # v3: skipped files kept


def _decode_folder(data, split):
    base, files = _folder_split(data, split)
    classes = sorted({f.relative_to(base).parts[0] for f in files if len(f.relative_to(base).parts) > 1})
    images, labels, bad = [], [], []

    def decode(f):
        try:
            return _to_32x32(f)
        except Exception:  # a truncated or non-image file: skipped, and said so below
            return None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for f, arr in zip(files, pool.map(decode, files, chunksize=256)):
            if arr is None:
                bad.append(f)
                continue
            images.append(arr)
            parts = f.relative_to(base).parts
            labels.append(classes.index(parts[0]) if len(parts) > 1 else -1)
    if not images:
        raise UserError(f"--data {data}: none of the {len(files)} image files in {base} could be read")
    # Files come sorted by class folder; a fixed shuffle makes every prefix (--limit-train N, the first
    # test images of a figure) a fair sample of all classes, as CIFAR-10's own order is.
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)[order].contiguous()
    return {"images": x, "labels": torch.tensor(labels)[order], "classes": classes,
            "skipped": [str(f.relative_to(base)) for f in bad]}


def _download_cifar10(root, split):
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root, train=(split == "train"), download=True)
    except Exception as e:  # no network (URLError), a refused connection, a corrupt archive...
        raise UserError(
            f"CIFAR-10 is not in {root}/ and could not be downloaded ({type(e).__name__}): put "
            f"cifar-10-python.tar.gz in {root}/, or pass --data PATH to train on any folder of images"
        ) from None
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return {"images": x, "labels": torch.tensor(ds.targets), "classes": list(ds.classes)}


def load_split(data, data_root, split):
    """{'images': uint8 (N, 3, 32, 32), 'labels', 'classes'} for `data` = 'cifar10' or a folder.

    Decoding 50,000 JPEGs takes seconds, so the result is cached under data_root, keyed by data_key():
    a second run reads one file, and any change to the folder's files makes a new key. Files that
    could not be decoded are named in a warning on every run, not only the first.
    """
    if split not in ("train", "test"):
        raise ValueError(split)
    if Path(data_root).exists() and not Path(data_root).is_dir():
        raise UserError(f"--data-root {data_root}: a file, not a folder")
    if data == "cifar10":
        return _download_cifar10(data_root, split)
    cache = Path(data_root) / "cache" / f"{data_key(data, split)}.pt"
    out = None
    if cache.exists():
        try:
            out = torch.load(cache, weights_only=True)
        except Exception:
            pass  # a damaged cache is rebuilt below
    if out is None:
        out = _decode_folder(data, split)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # two processes may build the same cache
        torch.save(out, tmp)
        os.replace(tmp, cache)  # atomic: a reader never sees half a file
    if out["skipped"]:
        print(f"warning: {len(out['skipped'])} unreadable image file(s) in --data {data} were skipped, e.g. "
              f"{out['skipped'][0]}", file=sys.stderr)
    return out


def load_images(data, data_root, split):
    """The uint8 image tensor (N, 3, 32, 32) of one split. The models never see labels."""
    return load_split(data, data_root, split)["images"]


class DeviceLoader:
    """Training batches cut on the device from a device-resident uint8 tensor.

    No workers and no PIL in the loop: one index_select per batch. Each epoch's permutation and
    flips come from a generator seeded by (seed, epoch), so resuming at an epoch boundary replays
    the same order with no state to save. Under DDP every rank draws the same permutation and takes
    a disjoint, interleaved shard of it.
    """

    def __init__(self, images, batch_size, device, seed=0, rank=0, world_size=1, flip=True):
        self.images = images.to(device)
        self.device, self.seed, self.rank, self.world, self.flip = torch.device(device), seed, rank, world_size, flip
        self.shard_size = len(images) // world_size
        if self.shard_size == 0:
            raise UserError(f"{len(images)} training images cannot be shared among {world_size} processes")
        self.batch_size = max(1, min(batch_size, self.shard_size))

    def __len__(self):
        return self.shard_size // self.batch_size

    def epoch(self, epoch):
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.images), generator=g, device=self.device)
        flips = torch.rand(len(self.images), generator=g, device=self.device) < 0.5
        shard = slice(self.rank, self.shard_size * self.world, self.world)
        perm, flips = perm[shard], flips[shard]
        for i in range(len(self)):
            batch = slice(i * self.batch_size, (i + 1) * self.batch_size)
            x = self.images[perm[batch]]  # (B, 3, 32, 32) uint8
            if self.flip:
                x = torch.where(flips[batch, None, None, None], x.flip(3), x)
            yield x.float() / 255


# 2-D toy data for the toy experiments. The mixture is the NCSN paper's (Song & Ermon 2019, Fig. 3).
MIXTURE_WEIGHTS, MIXTURE_MEANS, MIXTURE_STD = (0.8, 0.2), ((5.0, 5.0), (-5.0, -5.0)), 1.0


def toy_data(name, n, generator=None):
    """n points (n, 2) from 'mixture', '8gaussians' or 'rings'."""
    g = generator
    if name == "mixture":
        first = torch.rand(n, generator=g) < MIXTURE_WEIGHTS[0]
        means = torch.where(first[:, None], torch.tensor(MIXTURE_MEANS[0]), torch.tensor(MIXTURE_MEANS[1]))
        return means + MIXTURE_STD * torch.randn(n, 2, generator=g)
    if name == "8gaussians":
        angle = torch.randint(0, 8, (n,), generator=g) * (math.pi / 4)
        centres = 2.0 * torch.stack([angle.cos(), angle.sin()], 1)
        return centres + 0.15 * torch.randn(n, 2, generator=g)
    if name == "rings":
        radius = torch.randint(1, 4, (n,), generator=g).float()  # three rings, radii 1, 2, 3
        angle = 2 * math.pi * torch.rand(n, generator=g)
        return radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1) + 0.08 * torch.randn(n, 2, generator=g)
    raise UserError(f"unknown toy dataset {name!r} (choose mixture, 8gaussians or rings)")


def mixture_log_prob(x, sigma=0.0):
    """Exact log density of the toy mixture convolved with N(0, sigma^2 I); its gradient is the true score.

    Adding Gaussian noise to a Gaussian mixture only widens each component: var = std^2 + sigma^2.
    """
    means = torch.tensor(MIXTURE_MEANS, dtype=x.dtype, device=x.device)  # (2, 2)
    log_w = torch.tensor(MIXTURE_WEIGHTS, dtype=x.dtype, device=x.device).log()
    var = MIXTURE_STD**2 + torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1) ** 2
    sq = ((x[:, None, :] - means) ** 2).sum(-1) / var  # (N, 2)
    return torch.logsumexp(log_w - 0.5 * sq - torch.log(2 * math.pi * var), dim=1)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def largest_distance(images, n=1000):
    """Largest Euclidean distance between the first n uint8 images, as [0, 1] vectors of 3072 numbers."""
    x = images[:n].flatten(1).float() / 255
    return torch.cdist(x, x).max().item()


def bits_per_dim(nll_nats, dims=IMAGE_DIMS):
    """Negative log-likelihood of one image in nats -> bits per subpixel: nll / (D ln 2)."""
    return nll_nats / (dims * math.log(2))


def to_uint8(x):
    """Float images in [0, 1] (clamped first) -> uint8, as every metric and .npz receives them."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class _Uint8Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def generative_metrics(samples, data, data_root, extractor="inception-v3-compat", weights=None, device="cpu"):
    """FID, Inception Score and KID of `samples` (float in [0, 1]) against the training split.

    The reference statistics are cached by torch-fidelity under data_root, keyed by the data and
    the extractor. The sample count is returned beside the scores: FID is biased upwards for
    small N, and papers use 50,000 samples.
    """
    import torch_fidelity  # imported here: scripts that never compute a metric do not pay for it

    reference = load_images(data, data_root, "train")
    fake = to_uint8(samples.cpu())
    n, n_ref = len(fake), len(reference)
    if n < 2:
        raise UserError("--n: need at least 2 samples for FID / IS / KID")
    try:
        scores = torch_fidelity.calculate_metrics(
            input1=_Uint8Images(fake), input2=_Uint8Images(reference), input2_cache_name=f"{data_key(data, 'train')}",
            cache_root=str(Path(data_root) / "fidelity_cache"), feature_extractor=extractor,
            feature_extractor_weights_path=weights, cuda=torch.device(device).type == "cuda",
            isc=True, fid=True, kid=True, isc_splits=min(10, n), kid_subsets=10,
            kid_subset_size=min(1000, n, n_ref), verbose=False, batch_size=100,
            save_cpu_ram=True)  # = no DataLoader workers: the images are already tensors in memory
    except ValueError as e:  # torch-fidelity's own check, e.g. an extractor name it does not know
        raise UserError(f"--fid-extractor {extractor}: {e}") from None
    except OSError as e:
        raise UserError(f"could not load the {extractor} weights ({type(e).__name__}: no network?): download "
                        "them once elsewhere and pass --fid-weights FILE") from None
    return {"fid": scores["frechet_inception_distance"], "is_mean": scores["inception_score_mean"],
            "is_std": scores["inception_score_std"], "kid_mean": scores["kernel_inception_distance_mean"],
            "kid_std": scores["kernel_inception_distance_std"], "n_samples": n, "n_reference": n_ref,
            "extractor": extractor}


def fit_linear_probe(features, labels, classes, l2, max_iter=100):
    """Multinomial logistic regression, weights (F + 1, K) with the bias last: full-batch L-BFGS on the mean
    cross-entropy + l2/2 |W|^2. The problem is convex, so the answer does not depend on the start."""
    x = torch.nn.functional.pad(features, (0, 1), value=1.0)  # a constant feature carries the bias
    w = torch.zeros(x.shape[1], classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=max_iter, tolerance_grad=1e-5, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w, labels) + 0.5 * l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def linear_probe(train_x, train_y, test_x, test_y, classes, l2_grid=(1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)):
    """(top-1 test accuracy, l2) of a linear classifier on frozen, standardised features (N, F): how much of the
    labels a representation makes linearly readable. l2 is the grid value with the best accuracy on the last
    tenth of the training set, and the classifier is then refit on all of it. The one metric that reads labels."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    accuracy = lambda w, x, y: (torch.nn.functional.pad(x, (0, 1), value=1.0) @ w).argmax(1).eq(y).float().mean().item()  # noqa: E731
    n = len(train_x) - max(1, len(train_x) // 10)
    l2 = max(l2_grid, key=lambda l2: accuracy(fit_linear_probe(train_x[:n], train_y[:n], classes, l2),
                                              train_x[n:], train_y[n:]))
    return accuracy(fit_linear_probe(train_x, train_y, classes, l2), test_x, test_y), l2


# ----------------------------------------------------------------------------------------------
# Image grids and plots
# ----------------------------------------------------------------------------------------------

def save_grid(images, path, nrow=None):
    """Save (B, 3, H, W) images in [0, 1] (clamped) as one PNG grid."""
    from torchvision.utils import save_image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(images.detach().float().clamp(0, 1).cpu(), path, nrow=nrow or math.ceil(math.sqrt(len(images))))


def save_rows(rows, path, title=None):
    """A figure with one labelled row of images per (label, (B, 3, H, W) tensor) pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    width = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.9 * width + 1.5, 1.0 * len(rows) + 0.6), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows):
        grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=width, padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_metrics(run_dir, path=None):
    """Plot every numeric scalar of a run's metrics.jsonl against the step; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    keys = sorted({k for r in rows for k, v in r.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch")})
    if not keys:
        return None
    cols = min(3, len(keys))
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(4 * cols, 2.6 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
        ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path or Path(run_dir) / "metrics.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Command line: data exploration, loader benchmark, run comparison
# ----------------------------------------------------------------------------------------------

def explore(data, data_root, out_dir):
    """Describe the data: class counts, channel statistics, histograms, examples, the mean image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = load_split(data, data_root, "train"), load_split(data, data_root, "test")
    x = train["images"].float() / 255  # (N, 3, 32, 32)
    classes = train["classes"] or ["(no class folders)"]
    labels = train["labels"].clamp(min=0)
    counts = {c: int((labels == i).sum()) for i, c in enumerate(classes)}
    stats = {"data": data, "train_images": len(x), "test_images": len(test["images"]),
             "images_per_class": counts, "channel_mean": x.mean((0, 2, 3)).tolist(),
             "channel_std": x.std((0, 2, 3)).tolist(),
             "max_pairwise_distance_1000": largest_distance(train["images"], 1000)}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2))

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(list(counts), list(counts.values()), color="tab:blue")
    ax.set_ylabel("training images"), ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout(), fig.savefig(out_dir / "class_counts.png", dpi=100), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    for c, colour in enumerate(("red", "green", "blue")):
        hist = torch.bincount(train["images"][:, c].flatten().long(), minlength=256).float()
        ax.plot(hist / hist.sum(), color=colour, label="RGB"[c])
    ax.set_xlabel("pixel value"), ax.set_ylabel("frequency"), ax.legend()
    fig.tight_layout(), fig.savefig(out_dir / "pixel_histograms.png", dpi=100), plt.close(fig)

    per_class = [x[labels == i][:10] for i in range(len(classes))]
    save_rows([(c, imgs) for c, imgs in zip(classes, per_class) if len(imgs)], out_dir / "examples.png")
    save_grid(x.mean(0, keepdim=True), out_dir / "mean_image.png")
    print(f"{len(x)} training and {stats['test_images']} test images of 32x32 RGB")
    print("images per class: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    print("channel mean (R, G, B): " + ", ".join(f"{m:.3f}" for m in stats["channel_mean"]))
    print("channel std  (R, G, B): " + ", ".join(f"{s:.3f}" for s in stats["channel_std"]))
    print(f"largest distance between 1000 training images (NCSNv2's sigma_1 rule): "
          f"{stats['max_pairwise_distance_1000']:.1f}")
    print(f"figures and stats.json written to {out_dir}/")
    return stats


def bench_data(data, data_root, batch_size=128):
    """One epoch of DeviceLoader against a torchvision DataLoader (2 workers) over the same images."""
    from PIL import Image
    from torchvision import transforms

    images = load_images(data, data_root, "train")  # decoded once (cached), like a training run
    loader = DeviceLoader(images, batch_size, "cpu", seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core for us, two worker processes for the DataLoader
    start = time.perf_counter()
    n_ours = sum(len(x) for x in loader.epoch(0))
    ours = time.perf_counter() - start
    torch.set_num_threads(threads)

    if data == "cifar10":
        from torchvision.datasets import CIFAR10
        transform = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor()])
        dataset = CIFAR10(data_root, train=True, transform=transform)
    else:
        files = _folder_split(data, "train")[1]
        transform = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32),
                                        transforms.RandomHorizontalFlip(), transforms.ToTensor()])

        class Files(torch.utils.data.Dataset):
            def __len__(self):
                return len(files)

            def __getitem__(self, i):
                with Image.open(files[i]) as img:
                    return transform(img.convert("RGB")), 0
        dataset = Files()
    dl = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=2, drop_last=True)
    start = time.perf_counter()
    n_theirs = sum(len(x) for x, _ in dl)
    theirs = time.perf_counter() - start
    print(f"DeviceLoader (ours):          {n_ours} images in {ours:.3f} s ({n_ours / ours:,.0f} img/s)")
    print(f"DataLoader (2 workers, PIL):  {n_theirs} images in {theirs:.3f} s ({n_theirs / theirs:,.0f} img/s)")
    ratio = (n_ours / ours) / (n_theirs / theirs)
    print(f"ratio: ours is {ratio:.1f}x faster")
    return ratio


def _run_row(run_dir):
    """One row of the comparison table from what a run folder holds; None where it holds nothing."""
    run_dir = Path(run_dir)
    read = lambda name: json.loads((run_dir / name).read_text()) if (run_dir / name).exists() else {}  # noqa: E731
    rows, evaluation, bench, summary = read_metrics(run_dir), read("eval.json"), read("bench.json"), \
        read("summary.json")
    last = lambda key: next((r[key] for r in reversed(rows) if key in r), None)  # noqa: E731
    speeds = sorted(r["img_per_s"] for r in rows if "img_per_s" in r)
    epoch_seconds = [r["epoch_seconds"] for r in rows if "epoch_seconds" in r]
    try:
        ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True, mmap=True)  # lazy
    except Exception:  # missing, corrupt or not ours: its numbers are shown as missing
        ckpt = {}
    params = summary.get("parameters") or bench.get("parameters") or \
        (sum(v.numel() for v in ckpt["net"].values()) if "net" in ckpt else None)  # (the last counts buffers too)
    return {"run": run_dir.name, "model": run_dir.name.split("__")[0], "parameters": params,
            "img_per_s": speeds[len(speeds) // 2] if speeds else bench.get("train_images_per_s"),
            "epoch_seconds": sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else None,
            "epochs": ckpt.get("epoch"),
            "bits_per_dim": evaluation.get("test_iwae_bpd") or evaluation.get("test_bpd") or last("test_bpd"),
            "fid": evaluation.get("fid"), "is": evaluation.get("is_mean"), "kid": evaluation.get("kid_mean"),
            "n": evaluation.get("n_samples"), "extractor": evaluation.get("extractor"),
            "sampling_s_per_1000": evaluation.get("sampling_seconds_per_1000"),
            "nfe_per_sample": evaluation.get("nfe_per_sample") or bench.get("nfe_per_sample")}


def compare(run_dirs, out_dir="runs"):
    """runs/compare.md (a table; missing numbers shown as missing) and runs/compare.png (samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for run in run_dirs:
        if not (Path(run) / "config.json").exists():
            raise UserError(f"{run} is not a run folder (no config.json)")
    rows = [_run_row(run) for run in run_dirs]
    columns = [("model", "model", "{}"), ("run", "run", "{}"), ("parameters", "parameters", "{:,}"),
               ("img_per_s", "train img/s", "{:.1f}"), ("epoch_seconds", "s / epoch", "{:.0f}"),
               ("epochs", "epochs", "{}"), ("bits_per_dim", "test bits/dim", "{:.3f}"), ("fid", "FID", "{:.2f}"),
               ("is", "IS", "{:.2f}"), ("kid", "KID", "{:.4f}"), ("n", "N", "{:,}"), ("extractor", "features", "{}"),
               ("sampling_s_per_1000", "sampling s / 1000", "{:.1f}"), ("nfe_per_sample", "NFE / sample", "{:,}")]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["—" if row[key] is None else fmt.format(row[key]) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\n\n— : not measured for this run (never invented). FID / IS / KID depend on N and on the feature "
            "extractor; 'tiny-random' scores are offline test numbers, not comparable with papers.\n")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text("\n".join(lines) + note)
    grids = [(row["run"], sorted(Path(run).glob("samples/epoch_*.png"))[-1:] or sorted(Path(run).glob("samples*.png")))
             for run, row in zip(run_dirs, rows)]
    fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 4.4), squeeze=False)
    for ax, (name, files) in zip(axes[0], grids):
        if files:
            ax.imshow(plt.imread(files[0]))
        ax.set_title(name.replace("__", "\n", 1), fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_dir / "compare.png", dpi=100)
    plt.close(fig)
    print("\n".join(lines))
    print(f"wrote {out_dir}/compare.md and {out_dir}/compare.png")
    return rows


class OneLineErrors(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UserError(message)


def main(argv=None):
    parser = OneLineErrors(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("explore", "figures and statistics of a dataset"),
                       ("bench-data", "one epoch of our loader against a torchvision DataLoader")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--data", default="cifar10", help="'cifar10' or a folder of images")
        p.add_argument("--data-root", default="data", help="where CIFAR-10 and decoded-image caches live")
        if name == "explore":
            p.add_argument("--out", default="runs/data_exploration", help="output folder")
        else:
            p.add_argument("--batch-size", type=positive_int, default=128, help="images per batch")
    p = sub.add_parser("compare", help="one table (runs/compare.md) and one figure for several run folders")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="runs", help="where compare.md and compare.png go")
    args = parser.parse_args(argv)
    if args.command == "compare":
        compare(args.runs, args.out)
    elif args.command == "explore":
        explore(args.data, args.data_root, args.out)
    elif args.command == "bench-data":
        bench_data(args.data, args.data_root, args.batch_size)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"common.py: error: {e}")
