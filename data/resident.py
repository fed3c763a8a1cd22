"""The small datasets (Fashion-MNIST, CIFAR-10/100, synthetic): read once, whole, onto the training device as
uint8, and cropped, flipped and normalised there in batches."""
import gzip
import os
import struct
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from data.common import DataError, epoch_generator, normalize, rank_slots

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FIX = ("get a good copy: 'apt-get install --reinstall dataset-fashion-mnist', or download the file "
                     "again from github.com/zalandoresearch/fashion-mnist")


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
    except OSError as e:  # --download without a network (URLError), or a folder it cannot write
        raise DataError(f"--download: {name} could not be downloaded into {data_dir} ({e}); download it where there "
                        f"is internet and pass that folder as --data-dir") from None
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
