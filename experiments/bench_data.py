"""One epoch of common.py's DeviceLoader against a torchvision DataLoader over the same images.

    python experiments/bench_data.py --data PATH

The DeviceLoader keeps the decoded uint8 images in one tensor (on the GPU in training) and cuts
batches from a permutation with flips: no workers, no PIL. The DataLoader decodes the files with PIL
in two worker processes (ToTensor and RandomHorizontalFlip), as a typical training script does.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

import common  # noqa: E402


class Files(torch.utils.data.Dataset):
    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB")), 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="cifar10", help="'cifar10' or a folder of images")
    p.add_argument("--data-root", default="data",
                   help="where CIFAR-10 and decoded-image caches live")
    p.add_argument("--batch-size", type=common.positive_int, default=128, help="images per batch")
    args = p.parse_args(argv)
    # decoded once, as training does
    images = common.load_images(args.data, args.data_root, "train")
    loader = common.DeviceLoader(images, args.batch_size, "cpu", seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core for ours, two worker processes for the DataLoader
    start = time.perf_counter()
    n_ours = sum(len(x) for x in loader.epoch(0))
    ours = time.perf_counter() - start
    torch.set_num_threads(threads)
    flip = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    if args.data == "cifar10":
        from torchvision.datasets import CIFAR10

        dataset = CIFAR10(args.data_root, train=True, transform=flip)
    else:
        dataset = Files(common._folder_split(args.data, "train")[1],
                        transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32),
                                            flip]))
    dl = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                     num_workers=2, drop_last=True)
    start = time.perf_counter()
    n_theirs = sum(len(x) for x, _ in dl)
    theirs = time.perf_counter() - start
    print(f"DeviceLoader (ours):          {n_ours} images in {ours:.3f} s "
          f"({n_ours / ours:,.0f} img/s)")
    print(f"DataLoader (2 workers, PIL):  {n_theirs} images in {theirs:.3f} s "
          f"({n_theirs / theirs:,.0f} img/s)")
    ratio = (n_ours / ours) / (n_theirs / theirs)
    print(f"ratio: ours is {ratio:.1f}x faster")
    return ratio


if __name__ == "__main__":
    try:
        main()
    except common.UserError as e:
        sys.exit(f"bench_data.py: error: {e}")
