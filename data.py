"""Datasets: small ones resident on the training device with batched augmentation, ImageNet
through a DataLoader.

Both loaders yield, for each optimizer step, this rank's share of the global batch, and both
derive the data order from (seed, epoch) alone, so resuming at step k of an epoch needs nothing
but k, and a method flag never changes which images a step sees.
"""
import gzip
import os
import struct

import numpy as np
import torch

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagenet", "synthetic")

# Per-channel mean and std of the training images (0-1 scale).
STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


class DataError(ValueError):
    """A dataset that cannot be found or read; the message names the flag and the fix."""


def epoch_generator(seed, epoch, salt=0):
    """A CPU generator that depends only on (seed, epoch, salt): the source of every data-order draw."""
    return torch.Generator().manual_seed(hash((seed, epoch, salt)) & 0x7FFF_FFFF_FFFF_FFFF)


# ---- readers -------------------------------------------------------------------------------

def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        magic, = struct.unpack(">I", f.read(4))
        ndim = magic & 0xFF
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape).copy()


def _find_idx(folder, stem):
    for name in (stem, stem + ".gz"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def load_fashion_mnist(data_dir):
    folders = [data_dir] if data_dir else [FASHION_MNIST_SYSTEM_DIR]
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for folder in folders:
        paths = [_find_idx(folder, s) for s in stems]
        if all(paths):
            xtr, ytr, xva, yva = (_read_idx(p) for p in paths)
            return xtr[:, None], ytr, xva[:, None], yva
    where = data_dir or FASHION_MNIST_SYSTEM_DIR
    raise DataError(f"--data-dir: no Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...) in {where}; "
                    f"run 'apt-get install dataset-fashion-mnist' or pass --data-dir with the four IDX files")


def load_cifar(name, data_dir, download):
    import torchvision
    if not data_dir:
        raise DataError(f"--data-dir is required for --data {name}: the folder holding the torchvision layout "
                        f"(cifar-10-batches-py/ or cifar-100-python/)")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        tr, va = (cls(data_dir, train=t, download=download) for t in (True, False))
    except RuntimeError as e:
        raise DataError(f"--data-dir: {name} not found in {data_dir} ({e}); add --download where there is internet")
    as_nchw = lambda ds: np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))
    return as_nchw(tr), np.array(tr.targets), as_nchw(va), np.array(va.targets)


def make_synthetic(num_classes=10, n_train=4096, n_val=1024, size=32, seed=0):
    """Learnable random data: each class is a fixed random template plus noise."""
    g = np.random.default_rng(seed)
    templates = g.integers(0, 256, (num_classes, 3, size, size)).astype(np.float32)

    def draw(n):
        y = g.integers(0, num_classes, n)
        x = 0.6 * templates[y] + 0.4 * g.integers(0, 256, (n, 3, size, size))
        return x.astype(np.uint8), y
    return (*draw(n_train), *draw(n_val))


# ---- the resident path ---------------------------------------------------------------------

class ResidentData:
    """A whole uint8 dataset on `device`; batches are cropped, flipped and normalised there."""

    def __init__(self, xtr, ytr, xva, yva, mean, std, device, pad, flip, num_classes):
        to = lambda a, dt: torch.as_tensor(np.asarray(a), dtype=dt).to(device)
        self.train_x, self.train_y = to(xtr, torch.uint8), to(ytr, torch.long)
        self.val_x, self.val_y = to(xva, torch.uint8), to(yva, torch.long)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.pad, self.flip, self.num_classes, self.device = pad, flip, num_classes, device
        self.in_chans, self.image_size = self.train_x.shape[1], self.train_x.shape[2]

    def normalize(self, x_uint8):
        return (x_uint8.float() - self.mean) / self.std

    def augment(self, x, shifts, flips):
        """Random crop with zero padding (as a per-image translation) and horizontal flip, batched."""
        n, _, h, w = x.shape
        if self.pad:
            p = self.pad
            x = torch.nn.functional.pad(x, (p, p, p, p))
            rows = (torch.arange(h, device=x.device) + p + shifts[:, :1])  # (n, h)
            cols = (torch.arange(w, device=x.device) + p + shifts[:, 1:])  # (n, w)
            x = x[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
            x = x.permute(0, 3, 1, 2)
        if self.flip:
            x = torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x)
        return x

    def train_loader(self, batch_size, rank, world_size, seed):
        return ResidentLoader(self, batch_size, rank, world_size, seed)

    def val_batches(self, rank, world_size, batch_size):
        """This rank's strided shard of the validation set: every image is seen by exactly one rank."""
        idx = torch.arange(rank, len(self.val_y), world_size, device=self.device)
        for i in range(0, len(idx), batch_size):
            j = idx[i:i + batch_size]
            yield self.normalize(self.val_x[j]), self.val_y[j]


class ResidentLoader:
    """Per optimizer step, this rank's slice of the global batch, augmented on the device.

    The permutation and the augmentation draws of an epoch come from one generator seeded by
    (seed, epoch), over the global batch, so they do not depend on world size or accumulation."""

    def __init__(self, data, batch_size, rank, world_size, seed):
        self.data, self.batch_size, self.rank, self.world_size, self.seed = data, batch_size, rank, world_size, seed
        self.steps_per_epoch = len(data.train_y) // batch_size

    def epoch(self, epoch, start_step=0):
        d, n = self.data, len(self.data.train_y)
        g = epoch_generator(self.seed, epoch)
        perm = torch.randperm(n, generator=g)
        shifts = torch.randint(-d.pad, d.pad + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        perm, shifts, flips = perm.to(d.device), shifts.to(d.device), flips.to(d.device)
        local = self.batch_size // self.world_size
        for step in range(start_step, self.steps_per_epoch):
            lo = step * self.batch_size + self.rank * local
            sel = slice(lo, lo + local)
            idx = perm[sel]
            x = d.augment(d.train_x[idx], shifts[sel], flips[sel])
            yield d.normalize(x), d.train_y[idx]


# ---- the folder path (ImageNet) ------------------------------------------------------------

class FolderData:
    """An ImageFolder tree (train/, val/) read by DataLoader workers with the standard ResNet transforms."""

    def __init__(self, root, device, workers, image_size=224):
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(root, split)):
                raise DataError(f"--data-dir: {root} has no {split}/ folder; --data imagenet needs an ImageFolder "
                                f"tree with train/<class>/*.JPEG and val/<class>/*.JPEG")
        mean, std = STATS["imagenet"]
        self.train_set = ImageFolder(os.path.join(root, "train"), T.Compose([
            T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]))
        self.val_set = ImageFolder(os.path.join(root, "val"), T.Compose([
            T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)]))
        self.num_classes, self.in_chans, self.image_size = len(self.train_set.classes), 3, image_size
        self.device, self.workers = device, workers

    def _loader(self, dataset, sampler, batch_size, drop_last):
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                           num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                           persistent_workers=False, prefetch_factor=4 if self.workers else None)

    def train_loader(self, batch_size, rank, world_size, seed):
        return FolderLoader(self, batch_size, rank, world_size, seed)

    def val_batches(self, rank, world_size, batch_size):
        # Strided shard without padding (DistributedSampler would repeat images to even the shards).
        idx = list(range(rank, len(self.val_set), world_size))
        yield from on_device(self._loader(self.val_set, idx, batch_size, False), self.device)


class FolderLoader:
    def __init__(self, data, batch_size, rank, world_size, seed):
        self.data, self.local = data, batch_size // world_size
        self.sampler = torch.utils.data.DistributedSampler(data.train_set, world_size, rank, shuffle=True,
                                                           seed=seed, drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.local

    def epoch(self, epoch, start_step=0):
        self.sampler.set_epoch(epoch)
        # Resuming mid-epoch: the same order with the finished steps' indices dropped, so their images
        # are not decoded again (an index list is a valid DataLoader sampler).
        order = list(self.sampler)[start_step * self.local:]
        yield from on_device(self.data._loader(self.data.train_set, order, self.local, True), self.data.device)


def on_device(loader, device):
    """The loader's (x, y) batches on `device`. On CUDA the next batch's copy is issued on a side stream
    before the current batch is handed out, so host-to-device copies overlap the training step."""
    if device.type != "cuda":
        yield from ((x.to(device), y.to(device)) for x, y in loader)
        return
    stream, batches = torch.cuda.Stream(device), iter(loader)

    def copy_next():
        batch = next(batches, None)
        if batch is None:
            return None
        with torch.cuda.stream(stream):
            return tuple(t.to(device, non_blocking=True) for t in batch)

    ready = copy_next()
    while ready is not None:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(stream)
        for t in ready:  # the caching allocator must not reuse these while the compute stream reads them
            t.record_stream(compute)
        current, ready = ready, copy_next()
        yield current


def build_data(name, data_dir, device, subset=0, download=False, workers=8):
    """The dataset named by --data, ready to iterate on `device`."""
    if name not in DATASETS:
        raise DataError(f"--data: unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    if data_dir and not os.path.isdir(data_dir):
        raise DataError(f"--data-dir: {data_dir} is not a directory")
    if name == "imagenet":
        if not data_dir:
            raise DataError("--data-dir is required for --data imagenet (an ImageFolder tree with train/ and val/)")
        data = FolderData(data_dir, device, workers)
        if subset:
            data.train_set = torch.utils.data.Subset(data.train_set, range(min(subset, len(data.train_set))))
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
    return ResidentData(xtr, ytr, xva, yva, mean, std, device, pad, flip, num_classes)
