"""Datasets: small ones resident on the training device with batched augmentation (data/resident.py), ImageNet
folder trees through DataLoader workers (data/folder.py), or the same trees as shards (data/shards.py reads them,
data/prepare.py writes them: `python shards.py`); data/common.py holds what they all share.

Both loaders yield, for each optimizer step, this rank's slice of the global batch, and both derive
the data order and every augmentation draw from (seed, epoch) and the image's position in the epoch
alone, so resuming at step k of an epoch needs nothing but k, the global batch does not depend on the
number of ranks or workers, and a method flag never changes which images a step sees.
Batches are NCHW-contiguous (the channels-last method converts them itself).
"""
import os

import torch

from data.common import DATASETS, STATS, DataError
from data.folder import FolderData, on_device
from data.resident import FASHION_MNIST_SYSTEM_DIR, ResidentData, load_cifar, load_fashion_mnist, make_synthetic

__all__ = ["DATASETS", "FASHION_MNIST_SYSTEM_DIR", "STATS", "DataError", "ResidentData", "build_data", "make_synthetic",
           "on_device"]


def build_data(name, data_dir, device, subset=0, download=False, workers=8, augment=True, decode="cpu",
               image_size=224):
    """The dataset named by --data, ready to iterate on `device`. --subset N keeps the first N training images
    of a resident dataset (their files are already in random order) and a fixed random N of an ImageNet tree
    (sorted by class; drawn with seed 0, so every run trains on the same images). augment=False (--augment none):
    training images as evaluated (no crop or flip), a data-limited regime where regularisers matter."""
    if name not in DATASETS:
        raise DataError(f"--data: unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    if data_dir and not os.path.isdir(data_dir):
        raise DataError(f"--data-dir: {data_dir} is not a directory")
    if name == "imagenet":
        if not data_dir:
            raise DataError("--data-dir is required for --data imagenet (an ImageFolder tree with train/ and val/)")
        data = FolderData(data_dir, device, workers, image_size, augment=augment, decode=decode)
        if subset and subset < len(data.train_set):
            keep = torch.randperm(len(data.train_set), generator=torch.Generator().manual_seed(0))[:subset]
            data.train_set = torch.utils.data.Subset(data.train_set, keep.sort().values.tolist())
        return data
    if name == "fashion-mnist":
        arrays, pad, flip = load_fashion_mnist(data_dir), 2, True
    elif name == "synthetic":
        arrays, pad, flip = make_synthetic(), 2, True
    else:
        arrays, pad, flip = load_cifar(name, data_dir, download), 4, True
    xtr, ytr, xva, yva = arrays
    if subset:
        xtr, ytr = xtr[:subset], ytr[:subset]
    num_classes = 100 if name == "cifar100" else 10
    mean, std = STATS[name]
    if not augment:
        pad, flip = 0, False
    return ResidentData(xtr, ytr, xva, yva, mean, std, device, pad, flip, num_classes)
