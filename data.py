"""Datasets: small ones resident on the training device with batched augmentation, ImageNet
through DataLoader workers (imagefolder.py).

Both loaders yield, for each optimizer step, this rank's slice of the global batch, and both derive
the data order and every augmentation draw from (seed, epoch) and the image's position in the epoch
alone, so resuming at step k of an epoch needs nothing but k, the global batch does not depend on the
number of ranks or workers, and a method flag never changes which images a step sees.
Batches are NCHW-contiguous (the channels-last method converts them itself).
"""
import gzip
import os
import struct
import zlib

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FIX = ("get a good copy: 'apt-get install --reinstall dataset-fashion-mnist', or download the file "
                     "again from github.com/zalandoresearch/fashion-mnist")
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
    """A CPU generator that depends only on the integers (seed, epoch, salt): the source of every data draw."""
    return torch.Generator().manual_seed(hash((seed, epoch, salt)) & 0x7FFF_FFFF_FFFF_FFFF)


def rank_slots(step, batch_size, rank, world_size):
    """The positions in the epoch's order that `rank` trains on at `step`: its slice of the global batch."""
    local = batch_size // world_size
    lo = step * batch_size + rank * local
    return slice(lo, lo + local)


def normalize(x_uint8, mean, std):
    """uint8 images as floats normalised per channel (mean and std on the 0-255 scale), in their memory layout."""
    return x_uint8.float().sub_(mean).div_(std)  # in place on the new float tensor: one allocation


def check_split(images_file, labels_file, x, y, image_shape, num_classes):
    """Refuses images and labels that do not add up, naming the file at fault."""
    if len(x) == 0:
        raise DataError(f"--data-dir: {images_file} holds no images; replace it with a complete copy")
    if tuple(x.shape[1:]) != tuple(image_shape):
        raise DataError(f"--data-dir: {images_file} holds images of shape {tuple(x.shape[1:])}, expected "
                        f"{tuple(image_shape)}; is it the right dataset?")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"--data-dir: {labels_file} holds {len(y)} labels for the {len(x)} images of {images_file}; "
                        f"replace them with a matching, complete pair")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"--data-dir: {labels_file} has label {y.min() if y.min() < 0 else y.max()}, outside "
                        f"0..{num_classes - 1}; is it the right dataset?")


# ---- readers -------------------------------------------------------------------------------

def read_idx(path):
    """An IDX file of uint8 (gzipped when it ends in .gz) as an array; a corrupt file is a DataError."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError, a truncated .gz an EOFError
        raise DataError(f"--data-dir: cannot read {path} ({e}); {FASHION_MNIST_FIX}")
    ndim = raw[3] if len(raw) >= 4 and raw[:3] == b"\0\0\x08" else 0
    if not ndim or len(raw) < 4 + 4 * ndim:
        raise DataError(f"--data-dir: {path} is not an IDX file of uint8 (bad header); {FASHION_MNIST_FIX}")
    shape = struct.unpack_from(">" + "I" * ndim, raw, 4)
    size, have = int(np.prod(shape)), len(raw) - 4 - 4 * ndim
    if have != size:
        raise DataError(f"--data-dir: {path} is truncated or corrupt: its header promises "
                        f"{' x '.join(map(str, shape))} = {size} bytes, it holds {have}; {FASHION_MNIST_FIX}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_fashion_mnist(data_dir):
    """The four Fashion-MNIST IDX files of `data_dir` (or the Debian package's folder), checked."""
    folder = data_dir or FASHION_MNIST_SYSTEM_DIR
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = [next((p for p in (os.path.join(folder, s), os.path.join(folder, s + ".gz")) if os.path.exists(p)), None)
             for s in stems]
    if not all(paths):
        missing = ", ".join(s + "[.gz]" for s, p in zip(stems, paths) if not p)
        raise DataError(f"--data-dir: no Fashion-MNIST IDX files {missing} in {folder}; run 'apt-get install "
                        f"dataset-fashion-mnist' or pass --data-dir with the four IDX files")
    xtr, ytr, xva, yva = (read_idx(p) for p in paths)
    check_split(paths[0], paths[1], xtr, ytr, (28, 28), 10)
    check_split(paths[2], paths[3], xva, yva, (28, 28), 10)
    return xtr[:, None], ytr, xva[:, None], yva


def load_cifar(name, data_dir, download):
    """CIFAR-10/100 from the torchvision layout under `data_dir`, as NCHW uint8 arrays, checked."""
    import torchvision
    if not data_dir:
        raise DataError(f"--data-dir is required for --data {name}: the folder holding the torchvision layout "
                        f"(cifar-10-batches-py/ or cifar-100-python/)")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        tr, va = (cls(data_dir, train=t, download=download) for t in (True, False))
    except RuntimeError as e:
        raise DataError(f"--data-dir: {name} not found in {data_dir} ({e}); add --download where there is internet")
    arrays = []
    for ds, split in ((tr, "train"), (va, "test")):
        where = f"{os.path.join(data_dir, ds.base_folder)} ({split} batches)"
        x, y = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.array(ds.targets)
        check_split(where, where, x, y, (3, 32, 32), 100 if name == "cifar100" else 10)
        arrays += [x, y]
    return tuple(arrays)


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
        return normalize(x_uint8, self.mean, self.std)

    def augment(self, x, shifts, flips):
        """Random crop with zero padding (a per-image translation by `shifts`) and horizontal flip, as two
        gathers that keep the batch NCHW-contiguous."""
        n, c, h, w = x.shape
        p = self.pad
        if not (p or self.flip):
            return x
        if p:
            x = F.pad(x, (p, p, p, p))
            rows = torch.arange(h, device=x.device) + p + shifts[:, :1]  # (n, h)
            x = x.gather(2, rows[:, None, :, None].expand(n, c, h, x.shape[3]))
        cols = torch.arange(w, device=x.device)
        if self.flip:  # flipping the crop is reading its columns right to left
            cols = torch.where(flips[:, None], w - 1 - cols, cols)
        cols = cols + p + shifts[:, 1:]  # (n, w)
        return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))

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
        self.drawn = (None, None)  # (epoch, its permutation, shifts and flips on the device)

    def steps(self, path_steps):
        """(x, y) for each path step of `path_steps`, in order (any sequence: a whole run's, wsd's included)."""
        for step in path_steps:
            yield self.batch(step)

    def epoch(self, epoch, start_step=0):
        return self.steps(range(epoch * self.steps_per_epoch + start_step, (epoch + 1) * self.steps_per_epoch))

    def batch(self, path_step):
        d = self.data
        epoch, step = divmod(path_step, self.steps_per_epoch)
        if self.drawn[0] != epoch:
            n, g = len(d.train_y), epoch_generator(self.seed, epoch)
            perm = torch.randperm(n, generator=g)
            shifts = torch.randint(-d.pad, d.pad + 1, (n, 2), generator=g)
            flips = torch.rand(n, generator=g) < 0.5
            self.drawn = (epoch, (perm.to(d.device), shifts.to(d.device), flips.to(d.device)))
        perm, shifts, flips = self.drawn[1]
        sel = rank_slots(step, self.batch_size, self.rank, self.world_size)
        idx = perm[sel]
        return d.normalize(d.augment(d.train_x[idx], shifts[sel], flips[sel])), d.train_y[idx]


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
        from imagefolder import FolderData
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


def on_device(loader, device):
    """imagefolder.on_device (kept here for its callers)."""
    from imagefolder import on_device as to_device
    return to_device(loader, device)
