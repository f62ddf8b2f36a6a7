"""What vae.py, ebm.py and ncsn.py share: data loading, metrics and image grids, so that the three
models see the same data and are measured the same way. How a model is trained, checkpointed and
resumed lives in that model's file.

    python common.py explore --data PATH   # figures and numbers of the data
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

IMAGE_DIMS = 3 * 32 * 32  # one CIFAR-10 image: the D in bits per dimension
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class UserError(Exception):
    """A problem with the user's input: the scripts print it as one line and exit with status 1."""


def positive_int(text):  # argparse types, shared by every script's command line
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return int(text)


def number(accept, what):  # an argparse type for a finite float that accept() admits
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


positive_float = number(lambda v: v > 0, "a positive number")
non_negative_float = number(lambda v: v >= 0, "a number >= 0")
decay = number(lambda v: 0 <= v < 1, "in [0, 1)")  # a moving average's decay


def run_name(text):
    """A run's --name: one folder name (letters, digits, '.', '_', '-'), never a path."""
    if not text or text.strip(".") == "" or not all(c.isalnum() or c in "._-" for c in text):
        raise argparse.ArgumentTypeError(
            f"must be letters, digits, '.', '_' or '-' (a name, not a path), got {text!r}")
    return text


# ----------------------------------------------------------------------------------------------
# Data: any source becomes one uint8 tensor (N, 3, 32, 32), decoded once and cached
# ----------------------------------------------------------------------------------------------

def _to_32x32(path):
    """Decode one image file to a (32, 32, 3) uint8 array: RGB, shorter side 32, centre crop."""
    with Image.open(path) as img:
        if img.mode.startswith("I") or img.mode == "F":  # 16-bit/float grey: convert() would clip
            arr = np.asarray(img, dtype=np.float64)
            top = 255 if arr.max() <= 255 else 65535 if img.mode.startswith("I") else arr.max()
            img = Image.fromarray((arr / top * 255).round().clip(0, 255).astype(np.uint8))
        img = (img.convert("RGBA") if img.mode in ("P", "PA", "LA") else img).convert("RGB")
        if img.size != (32, 32):
            scale = 32 / min(img.size)
            w, h = (max(32, round(side * scale)) for side in img.size)
            left, top = (w - 32) // 2, (h - 32) // 2
            img = img.resize((w, h), Image.BICUBIC).crop((left, top, left + 32, top + 32))
        return np.asarray(img, dtype=np.uint8)


def _image_files(folder):
    files = Path(folder).rglob("*")
    return sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _folder_split(path, split):
    """A split's files: `train/` or `test/` if both subfolders exist, else a fixed 5% hold-out."""
    root = Path(path)
    if not root.is_dir():
        what = "a file, not a folder" if root.exists() else "no such folder"
        raise UserError(f"--data {path}: {what} (give a folder of images, or 'cifar10')")
    if (root / "train").is_dir() and (root / "test").is_dir():
        base, files = root / split, _image_files(root / split)
    else:
        base, files = root, _image_files(root)
        if len(files) >= 2:  # seed 0, never the run's: a test image stays a test image
            order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
            n_test = max(1, round(0.05 * len(files)))
            keep = sorted(order[:n_test] if split == "test" else order[n_test:])
            files = [files[i] for i in keep]
    if not files:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(f"--data {path}: no images ({extensions}) in {base}")
    return base, files


def data_key(data, split):
    """A short name that changes whenever the split's files do (names, sizes, modified times)."""
    if data == "cifar10":
        return f"cifar10-{split}"
    base, files = _folder_split(data, split)
    h = hashlib.sha1(str(base.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(base)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return f"{Path(data).resolve().name}-{split}-{h.hexdigest()[:12]}-v3"  # v3: the cache's format


def _decode_folder(data, split):
    base, files = _folder_split(data, split)
    parts = [f.relative_to(base).parts for f in files]  # ('cat', 'x.png'), or ('x.png',) if flat
    classes = sorted({p[0] for p in parts if len(p) > 1})
    images, labels, skipped = [], [], []

    def decode(f):  # None for a truncated or non-image file: skipped, and said so in load_split
        with contextlib.suppress(Exception):
            return _to_32x32(f)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for p, arr in zip(parts, pool.map(decode, files, chunksize=256)):
            if arr is None:
                skipped.append(str(Path(*p)))
            else:
                images.append(arr)
                labels.append(classes.index(p[0]) if len(p) > 1 else -1)
    if not images:
        raise UserError(f"--data {data}: none of {len(files)} image files in {base} could be read")
    # Files come sorted by class; a fixed shuffle makes every prefix (--limit-train N, the first
    # test images of a figure) a fair sample of all classes, as CIFAR-10's own order is.
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)[order].contiguous()
    return {"images": x, "labels": torch.tensor(labels)[order], "classes": classes,
            "skipped": skipped}


def _download_cifar10(root, split):
    from torchvision.datasets import CIFAR10  # imported here: torchvision takes seconds to load
    try:
        ds = CIFAR10(root, train=(split == "train"), download=True)
    except Exception as e:  # no network (URLError), a refused connection, a corrupt archive...
        raise UserError(f"CIFAR-10 is not in {root}/ and could not be downloaded "
                        f"({type(e).__name__}): put cifar-10-python.tar.gz in {root}/, or pass "
                        "--data PATH to train on any folder of images") from None
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
    return {"images": x, "labels": torch.tensor(ds.targets), "classes": list(ds.classes)}


def load_split(data, data_root, split):
    """{'images': uint8 (N, 3, 32, 32), 'labels', 'classes'} for `data` = 'cifar10' or a folder.
    A folder is decoded once (50,000 JPEGs take seconds) and cached under data_root by data_key().
    Under torchrun, rank 0 downloads or decodes while the others wait, then they read its files."""
    if Path(data_root).exists() and not Path(data_root).is_dir():
        raise UserError(f"--data-root {data_root}: a file, not a folder")
    first = not dist.is_initialized() or dist.get_rank() == 0
    if not first:
        dist.barrier()  # wait for rank 0 ...
    try:
        out = (_download_cifar10(data_root, split) if data == "cifar10"
               else _cached_folder(data, data_root, split))
    finally:
        if first and dist.is_initialized():
            dist.barrier()  # ... which lets the others go once its files are in place
    if out.get("skipped"):  # said on every run, not only the one that built the cache
        print(f"warning: {len(out['skipped'])} unreadable image file(s) in --data {data} were "
              f"skipped, e.g. {out['skipped'][0]}", file=sys.stderr)
    return out


def _cached_folder(data, data_root, split):
    cache = Path(data_root) / "cache" / f"{data_key(data, split)}.pt"
    if cache.exists():
        with contextlib.suppress(Exception):  # a damaged cache is rebuilt below
            return torch.load(cache, weights_only=True)
    out = _decode_folder(data, split)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # two processes may build one cache
    torch.save(out, tmp)
    os.replace(tmp, cache)  # atomic: a reader never sees half a file
    return out


def load_images(data, data_root, split):
    """The uint8 image tensor (N, 3, 32, 32) of one split. The models never see labels."""
    return load_split(data, data_root, split)["images"]


class DeviceLoader:
    """Batches cut on the device from a device-resident uint8 tensor (no workers, no PIL). The
    permutation and flips are seeded by (seed, epoch): a resumed run replays them with nothing to
    save. Under DDP each rank takes a disjoint, interleaved shard of the same permutation."""

    def __init__(self, images, batch_size, device, seed=0, rank=0, world_size=1, flip=True):
        self.images, self.device = images.to(device), torch.device(device)
        self.seed, self.rank, self.world, self.flip = seed, rank, world_size, flip
        self.shard_size = len(images) // world_size
        if self.shard_size == 0:
            raise UserError(f"{len(images)} images cannot be shared by {world_size} processes")
        self.batch_size = max(1, min(batch_size, self.shard_size))

    def __len__(self):
        return self.shard_size // self.batch_size

    def epoch(self, epoch):
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + epoch)
        shard = slice(self.rank, self.shard_size * self.world, self.world)  # this rank's share
        perm = torch.randperm(len(self.images), generator=g, device=self.device)[shard]
        flips = (torch.rand(len(self.images), generator=g, device=self.device) < 0.5)[shard]
        for i in range(len(self)):
            batch = slice(i * self.batch_size, (i + 1) * self.batch_size)
            x = self.images[perm[batch]]  # (B, 3, 32, 32) uint8
            if self.flip:
                x = torch.where(flips[batch, None, None, None], x.flip(3), x)
            yield x.float() / 255


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def largest_distance(images, n=1000):
    """Largest Euclidean distance between the first n uint8 images, as vectors in [0, 1]^3072."""
    x = images[:n].flatten(1).float() / 255
    return torch.cdist(x, x).max().item()


def bits_per_dim(nll_nats, dims=IMAGE_DIMS):
    """Negative log-likelihood of one image in nats -> bits per subpixel: nll / (D ln 2)."""
    return nll_nats / (dims * math.log(2))


def to_uint8(x):
    """Float images in [0, 1] (clamped first) -> uint8, as every metric and .npz receives them."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class _Uint8Images(torch.utils.data.Dataset):  # the form torch-fidelity reads: one image per item
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def check_metrics(n, extractor="inception-v3-compat", weights=None):
    """Raises UserError unless FID / IS / KID of n samples can be computed here: n >= 2, a known
    extractor, its weights loaded. --eval asks before it samples: no hour of sampling is lost."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY as known
    from torch_fidelity.utils import create_feature_extractor
    if n < 2 or extractor not in known:
        raise UserError("--n: need at least 2 samples for FID / IS / KID" if n < 2 else
                        f"--fid-extractor {extractor}: not one of {', '.join(known)}")
    layer = known[extractor].get_default_feature_layer_for_metric("fid")
    try:
        create_feature_extractor(extractor, [layer], cuda=False, verbose=False,
                                 feature_extractor_weights_path=weights)
    except Exception as e:  # no network; no such file, or not a weights file
        raise UserError(f"--fid-weights {weights}: not a readable weights file" if weights else
                        f"could not load the {extractor} weights ({type(e).__name__}: no network?)"
                        ": download them once elsewhere and pass --fid-weights FILE") from None


def generative_metrics(samples, data, data_root, extractor="inception-v3-compat", weights=None,
                       device="cpu"):
    """FID, Inception Score and KID of `samples` (float in [0, 1]) against the training split,
    with the sample count beside them: FID is biased upwards for small N (papers use 50,000).
    Callers run check_metrics first, before they sample (it loads the extractor once to see)."""
    import torch_fidelity  # imported here: scripts that never compute a metric do not pay for it
    reference, fake = load_images(data, data_root, "train"), to_uint8(samples.cpu())
    n, n_ref = len(fake), len(reference)
    scores = torch_fidelity.calculate_metrics(  # reference statistics cached under data_root
        input1=_Uint8Images(fake), input2=_Uint8Images(reference),
        input2_cache_name=data_key(data, "train"),
        cache_root=str(Path(data_root) / "fidelity_cache"), feature_extractor=extractor,
        feature_extractor_weights_path=weights, cuda=torch.device(device).type == "cuda",
        isc=True, fid=True, kid=True, isc_splits=min(10, n), kid_subsets=10,
        kid_subset_size=min(1000, n, n_ref), verbose=False, batch_size=100,
        save_cpu_ram=True)  # = no DataLoader workers: the images are already tensors in memory
    names = {"fid": "frechet_inception_distance", "is_mean": "inception_score_mean",
             "is_std": "inception_score_std", "kid_mean": "kernel_inception_distance_mean",
             "kid_std": "kernel_inception_distance_std"}
    return {**{k: scores[v] for k, v in names.items()}, "n_samples": n, "n_reference": n_ref,
            "extractor": extractor}


# ----------------------------------------------------------------------------------------------
# Image grids and plots
# ----------------------------------------------------------------------------------------------

def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig, path, title=None, dpi=100):
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")  # row labels outside the axes included
    pyplot().close(fig)


def save_grid(images, path, nrow=None, caption=None):
    """(B, 3, H, W) images in [0, 1] (clamped) as a PNG grid, under a caption saying what drew them
    (a picture is a claim)."""
    from torchvision.utils import make_grid, save_image
    images, path = images.detach().float().clamp(0, 1).cpu(), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    if not caption:
        return save_image(images, path, nrow=nrow)
    plt = pyplot()
    grid = make_grid(images, nrow=nrow, padding=1, pad_value=1.0).permute(1, 2, 0).numpy()
    fig = plt.figure(figsize=(grid.shape[1] / 50 + 0.2, grid.shape[0] / 50 + 0.45))
    fig.add_axes((0.01, 0.01, 0.98, 1 - 0.4 / fig.get_figheight())).imshow(grid)
    fig.axes[0].set_axis_off()
    fig.suptitle(caption, fontsize=7, y=0.995, va="top")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_rows(rows, path, title=None):
    """A figure with one labelled row of images per (label, (B, 3, H, W) tensor) pair."""
    from torchvision.utils import make_grid
    width = max(len(images) for _, images in rows)
    fig, axes = pyplot().subplots(len(rows), 1, figsize=(0.9 * width + 1.5, len(rows) + 0.6),
                                  squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows):
        grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=width, padding=1,
                         pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    _save_figure(fig, path, title, dpi=110)


def save_panels(panels, path, box, title=None):
    """2-D plots side by side, one per (title, tensor): points (N, 2) as a scatter, or values (H, W)
    on a grid over [-box, box]^2 as an image."""
    fig, axes = pyplot().subplots(1, len(panels), figsize=(4 * len(panels), 4.3), squeeze=False)
    for ax, (name, x) in zip(axes[0], panels.items()):
        if x.shape[1] == 2:
            ax.scatter(*x.T, s=2, alpha=0.5)
        else:
            ax.imshow(x.numpy(), extent=(-box, box, -box, box), origin="lower")
        ax.set(xlim=(-box, box), ylim=(-box, box), aspect="equal")
        ax.set_title(name, fontsize=9)
    _save_figure(fig, path, title)


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(r) for r in path.read_text().splitlines() if r] if path.exists() else []


def plot_metrics(run_dir, path=None):
    """Plot every numeric scalar of a run's metrics.jsonl against the step; returns the PNG path."""
    rows = read_metrics(run_dir)
    keys = sorted({k for r in rows for k, v in r.items() if k not in ("step", "epoch")
                   and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not keys:
        return None
    cols, n_rows = min(3, len(keys)), math.ceil(len(keys) / min(3, len(keys)))
    fig, axes = pyplot().subplots(n_rows, cols, figsize=(4 * cols, 2.6 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
        ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    path = Path(path or Path(run_dir) / "metrics.png")
    _save_figure(fig, path)
    return path


# ----------------------------------------------------------------------------------------------
# The data exploration (python common.py explore)
# ----------------------------------------------------------------------------------------------

def explore(data, data_root, out_dir):
    """Describe the data: class counts, channel statistics, histograms, examples, the mean image."""
    plt, out_dir = pyplot(), Path(out_dir)
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
    _save_figure(fig, out_dir / "class_counts.png")
    fig, ax = plt.subplots(figsize=(6, 3))
    for c, colour in enumerate(("red", "green", "blue")):
        hist = torch.bincount(train["images"][:, c].flatten().long(), minlength=256).float()
        ax.plot(hist / hist.sum(), color=colour, label="RGB"[c])
    ax.set_xlabel("pixel value"), ax.set_ylabel("frequency"), ax.legend()
    _save_figure(fig, out_dir / "pixel_histograms.png")
    examples = [(c, x[labels == i][:10]) for i, c in enumerate(classes)]
    save_rows([(c, imgs) for c, imgs in examples if len(imgs)], out_dir / "examples.png")
    save_grid(x.mean(0, keepdim=True), out_dir / "mean_image.png")
    print(f"{len(x)} training and {stats['test_images']} test images of 32x32 RGB")
    print("images per class: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    print("channel mean (R, G, B): " + ", ".join(f"{m:.3f}" for m in stats["channel_mean"]))
    print("channel std  (R, G, B): " + ", ".join(f"{s:.3f}" for s in stats["channel_std"]))
    print(f"largest distance between 1000 training images (NCSNv2's sigma_1 rule): "
          f"{stats['max_pairwise_distance_1000']:.1f}")
    print(f"figures and stats.json written to {out_dir}/")
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, usage=argparse.SUPPRESS,  # (errors: one line)
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["explore"], help="figures and statistics of a dataset")
    p.add_argument("--data", default="cifar10", help="'cifar10' or a folder of images")
    p.add_argument("--data-root", default="data", help="where CIFAR-10 and image caches live")
    p.add_argument("--out", default="runs/data_exploration", help="output folder")
    args = p.parse_args(argv)
    explore(args.data, args.data_root, args.out)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"common.py: error: {e}")
