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
from types import SimpleNamespace

import torch

from data.common import DATASETS, STATS, DataError
from data.folder import FolderData, on_device
from data.resident import FASHION_MNIST_SYSTEM_DIR, ResidentData, load_cifar, load_fashion_mnist, make_synthetic

__all__ = ["DATASETS", "FASHION_MNIST_SYSTEM_DIR", "STATS", "DataError", "ResidentData", "StandIn", "build_data",
           "data_here", "make_synthetic", "on_device"]


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


# each dataset's training images and (classes, channels, side; None: --image-size): what a stand-in knows of it
SHAPES = {"fashion-mnist": (60000, 10, 1, 28), "cifar10": (50000, 10, 3, 32), "cifar100": (50000, 100, 3, 32),
          "imagenet": (1281167, 1000, 3, None)}


def data_here(name, data_dir):
    """Whether build_data would read the data here (or fail in its own words: CIFAR and ImageNet need --data-dir):
    False only for a --data-dir that is not a folder here, and Fashion-MNIST's default folder where it is missing."""
    if name not in SHAPES:
        return True
    if data_dir:
        return os.path.isdir(data_dir)
    return name != "fashion-mnist" or os.path.isdir(FASHION_MNIST_SYSTEM_DIR)


class StandIn:
    """A dataset that is not here (train.py --check): its shape and its training set's size, no images; enough to
    build the model and run it on blank images, and to plan the schedule at the run's steps per epoch."""

    def __init__(self, name, device, subset=0, image_size=224):
        n, self.num_classes, self.in_chans, side = SHAPES[name]
        self.n_train, self.image_size, self.device = min(subset or n, n), side or image_size, device

    def train_loader(self, batch_size, rank, world_size, seed):
        return SimpleNamespace(steps_per_epoch=self.n_train // batch_size)
