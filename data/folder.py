"""ImageNet-style folder trees (train/<class>/*, val/<class>/*), or their shards, read by DataLoader workers.

Workers read each file, decode it with torchvision.io (libjpeg-turbo; PIL for formats it cannot read) and crop,
resize and flip it as a uint8 tensor (transforms.v2), and ship uint8 batches: a quarter of float32's shared
memory. The training device converts them to float, normalises them and keeps them NCHW. With --decode cuda the
workers only read the bytes and draw the crop, and the GPU decodes each batch at once (nvJPEG) and crops,
resizes, flips and normalises it.

As on the resident path, an epoch's order and each image's augmentation come from (seed, epoch) and the image's
position alone (data.common.epoch_generator), whatever the worker, the number of workers or a resume; every rank
takes its own slots of the global batch (data.common.rank_slots), so ranks see different images with different draws and
every image once per epoch across ranks. The training loop asks for the batches of a whole run at once
(FolderLoader.steps): one DataLoader and one set of workers per run, no refill at each epoch or wsd segment.
"""
import atexit
import multiprocessing
import os
import signal
import sys

import torch

from data import shards
from data.common import STATS, DataError, epoch_generator, normalize, rank_slots
from data.images import jpeg_header, raise_named, read_image

DECODERS = ("cpu", "cuda")


def signals_left_to_train_py(worker_id):
    """A DataLoader worker ignores SIGTERM and SIGINT: SLURM signals every process of the job, torchrun a worker's
    whole process group and a terminal its foreground group, and a worker killed by one failed train.py's next batch
    in the middle of its stop checkpoint (torch lets a SIGTERM from anyone but the worker's parent through). train.py
    stops at a checkpoint; its workers end as the DataLoader shuts them down, or at its exit
    (workers_killed_at_exit)."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


def workers_killed_at_exit():
    """At the main process's exit, SIGKILL the DataLoader workers still alive (a run that fails mid-batch leaves them
    busy; other children, a Pool's, are left alone): multiprocessing's own exit handler ends them with SIGTERM,
    which they ignore, and then joins them, forever. atexit calls the handlers last-registered first, so this one,
    registered after multiprocessing's (at its import), runs before it."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would raise for each worker killed here
    for p in multiprocessing.active_children():
        if p.daemon and process_name(p.pid) == "pt_data_worker":  # torch names its workers so; a Pool's are not
            p.kill()
            p.join(5)


def process_name(pid):
    """A process's name (Linux: /proc/PID/comm), or None."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


KILL_AT_EXIT = []  # registered once, with the first workers


def open_splits(root, train_transform, val_transform, option="--data-dir"):
    """(train, val) of root, each an ImageFolder or a shards.ShardSet, checked: both stored alike (a tree, or
    shards of the same settings) and with the same classes; else a DataError naming `option`."""
    train, val = (image_folder(root, split, t, option) for split, t in (("train", train_transform),
                                                                        ("val", val_transform)))
    kinds = [shards.settings(getattr(s, "meta", None)) for s in (train, val)]
    if kinds[0] != kinds[1]:
        raise DataError(f"{option}: {root}'s train/ and val/ are stored differently (train/: {kinds[0]}, val/: "
                        f"{kinds[1]}); prepare both with one `python shards.py` run")
    train_classes, val_classes = set(train.classes), set(val.classes)
    if train_classes != val_classes:  # labels are indices into the sorted class list: they would not match
        few = lambda names: ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "") or "none"
        raise DataError(f"{option}: {root}/val/ and train/ have different class folders (only in train/: "
                        f"{few(train_classes - val_classes)}; only in val/: {few(val_classes - train_classes)}); "
                        f"val/ needs exactly train/'s classes")
    return train, val


def image_folder(root, split, transform, option="--data-dir"):
    """torchvision's ImageFolder of root/split with our decoder (shards.ShardSet where `python shards.py` prepared
    root), or a DataError naming `option` and saying how to arrange the tree."""
    from torchvision.datasets import ImageFolder
    if os.path.exists(os.path.join(root, shards.MARK)):
        raise DataError(f"{option}: {root} is an unfinished `python shards.py` output; run it again to finish")
    if shards.is_prepared(root, split):
        return shards.ShardSet(os.path.join(root, split), transform, option)
    path = os.path.join(root, split)
    layout = "it needs an ImageFolder tree with train/<class>/*.JPEG and val/<class>/*.JPEG"
    if not os.path.isdir(path):
        raise DataError(f"{option}: {root} has no {split}/ folder; {layout}")
    if not any(entry.is_dir() for entry in os.scandir(path)):
        how = " (the ILSVRC download's flat val/: sort it with the well-known valprep.sh script)" * (split == "val")
        raise DataError(f"{option}: {path} has no class folders; {layout}{how}")
    try:
        return ImageFolder(path, transform, loader=read_image)
    except FileNotFoundError as e:  # a class folder without images
        raise DataError(f"{option}: {path}: {e}")


def transforms(image_size, train):
    """uint8 tensor transforms: RandomResizedCrop and a flip for training; resize to 256/224 of the size and a
    centre crop for validation (and for training without augmentation)."""
    from torchvision.transforms import v2
    if train:
        return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])
    return v2.Compose([v2.Resize(int(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)])


class FolderData:
    """An ImageFolder tree (train/, val/): uint8 batches from DataLoader workers, normalised on the device."""

    def __init__(self, root, device, workers, image_size=224, augment=True, decode="cpu"):
        self.train_set, self.val_set = open_splits(root, transforms(image_size, augment), transforms(image_size, False))
        self.num_classes, self.in_chans, self.image_size = len(self.train_set.classes), 3, image_size
        self.device, self.workers, self.augment, self.decode = device, workers, augment, decode
        self.storage = shards.storage(getattr(self.train_set, "meta", None))  # config.json's data_storage
        if self.storage != "folder":  # which images, in which order, with which labels: both splits'
            self.storage["index_crc32"] = [self.train_set.fingerprint(), self.val_set.fingerprint()]
        resized = int(image_size * 256 / 224)  # validation's resize (and training's without augmentation)
        if self.storage != "folder" and self.storage["short_side"] < resized and os.environ.get("RANK", "0") == "0":
            print(f"--data-dir: warning: the shards store images at a shorter side of {self.storage['short_side']}, "
                  f"below the {resized} that --image-size {image_size} evaluates at: every validation image is "
                  f"upsampled; prepare them with --short-side {resized} or more", file=sys.stderr)
        mean, std = STATS["imagenet"]
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.val_loaders = {}

    def loader(self, samples, batches, persistent=False):
        """A DataLoader of `samples` over `batches` (an iterable of index lists), uint8 batches out (--decode cuda:
        the batch's files as one flat byte tensor, collate_encoded)."""
        gpu = self.decode == "cuda"
        if self.workers and not KILL_AT_EXIT:
            KILL_AT_EXIT.append(atexit.register(workers_killed_at_exit))
        return torch.utils.data.DataLoader(
            samples, batch_sampler=batches, num_workers=self.workers, pin_memory=self.device.type == "cuda",
            persistent_workers=persistent and self.workers > 0, prefetch_factor=4 if self.workers else None,
            collate_fn=collate_encoded if gpu else None, generator=torch.Generator().manual_seed(0),  # keyed draws
            worker_init_fn=signals_left_to_train_py)

    def batches_on_device(self, loader):
        """(x, y) on the device, x normalised float NCHW: decoded there first under --decode cuda."""
        for x, y in on_device(loader, self.device) if self.decode == "cpu" else gpu_batches(loader, self):
            yield normalize(x, self.mean, self.std), y

    def train_loader(self, batch_size, rank, world_size, seed):
        return FolderLoader(self, batch_size, rank, world_size, seed)

    def close(self):
        """Stop the validation workers (persistent ones otherwise wait for the interpreter's exit, where pinned
        memory can hold up the join)."""
        for loader in self.val_loaders.values():
            if getattr(loader, "_iterator", None) is not None:
                loader._iterator._shutdown_workers()
        self.val_loaders = {}

    def val_batches(self, rank, world_size, batch_size):
        """This rank's strided shard of val/ (no padding: DistributedSampler would repeat images), from one
        DataLoader with persistent workers per (rank, world size, batch size): evaluations spawn no workers."""
        key = (id(self.val_set), rank, world_size, batch_size)
        if key not in self.val_loaders:
            idx = list(range(rank, len(self.val_set), world_size))
            batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
            samples = (EncodedSamples if self.decode == "cuda" else NamedSamples)(self.val_set, self.image_size,
                                                                                 train=False)
            self.val_loaders[key] = self.loader(samples, batches, persistent=True)
        yield from self.batches_on_device(self.val_loaders[key])


class FolderLoader:
    """Per optimizer step, this rank's slice of the global batch, decoded and augmented by DataLoader workers.

    An epoch's order and each position's augmentation seed come from one generator seeded by (seed, epoch),
    as on the resident path; a resumed run asks only for the remaining steps, so the finished steps' images are
    not decoded again and the rest get the same crops and flips as without the interruption."""

    def __init__(self, data, batch_size, rank, world_size, seed):
        self.data, self.batch_size, self.rank, self.world_size, self.seed = data, batch_size, rank, world_size, seed
        self.steps_per_epoch = len(data.train_set) // batch_size
        self.drawn = (None, None)  # (epoch, (order, draw seeds)): the epoch the keys come from

    def keys(self, path_step):
        """[(image index, draw seed), ...]: this rank's images of path step `path_step`."""
        epoch, step = divmod(path_step, self.steps_per_epoch)
        if self.drawn[0] != epoch:
            g = epoch_generator(self.seed, epoch)
            n = len(self.data.train_set)
            self.drawn = (epoch, (torch.randperm(n, generator=g), torch.randint(0, 2 ** 62, (n,), generator=g)))
        order, seeds = self.drawn[1]
        slots = rank_slots(step, self.batch_size, self.rank, self.world_size)
        return list(zip(order[slots].tolist(), seeds[slots].tolist()))

    def steps(self, path_steps):
        """(x, y) for each path step of `path_steps` (any sequence: a whole run's, wsd's branches included), from
        one DataLoader that prefetches across epochs."""
        d = self.data
        samples = (EncodedSamples if d.decode == "cuda" else SeededSamples)(d.train_set, d.image_size,
                                                                              train=d.augment)
        yield from d.batches_on_device(d.loader(samples, (self.keys(s) for s in path_steps)))

    def epoch(self, epoch, start_step=0):
        spe = self.steps_per_epoch
        return self.steps(range(epoch * spe + start_step, (epoch + 1) * spe))


class NamedSamples(torch.utils.data.Dataset):
    """`dataset[index]`, with a damaged image named (the validation set's reader)."""

    def __init__(self, dataset, image_size=None, train=False):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return named_sample(self.dataset, index)


class SeededSamples(NamedSamples):
    """`dataset[index]` for the key (index, draw_seed), with torch's global CPU generator seeded by draw_seed:
    torchvision's random transforms draw from it, so an image's crop and flip depend on its key alone, in
    whichever worker or process it is decoded. The caller's generator state is restored."""

    def __getitem__(self, key):
        return seeded_sample(self.dataset, key)


def seeded_sample(dataset, key, read=None):
    """named_sample for the key (index, draw_seed) with torch's global CPU generator seeded by draw_seed, the
    caller's generator state put back after."""
    index, draw_seed = key
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(draw_seed)
    try:
        return named_sample(dataset, index, read)
    finally:
        torch.set_rng_state(state)


def named_sample(dataset, index, read=None):
    """dataset[index] of an ImageFolder or ShardSet (or a Subset of one), or read(base dataset, its index) where
    given; an image that cannot be decoded (truncated, not an image) is a DataError naming its file. The run stops
    there rather than skip it: a skipped image would change the batch, and so the run, without a word."""
    try:
        return dataset[index] if read is None else read(*base_of(dataset, index))
    except Exception as e:
        base, i = base_of(dataset, index)
        if hasattr(base, "where"):  # shards: their stored bytes are damaged, not the source tree's file
            raise_named(e, base.where(i), base.then, replace=False)
        raise_named(e, base.samples[i][0] if hasattr(base, "samples") else f"image {i}",
                    getattr(base, "then", "continue with --resume"))


def base_of(dataset, index):
    """(ImageFolder or ShardSet, index in it) of dataset[index] through any Subsets."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    return dataset, index


# ---- --decode cuda -----------------------------------------------------------------------------------

class EncodedSamples(NamedSamples):
    """For GPU decoding: (payload, label, crop box, flip) per key, where the payload is the file's bytes (a JPEG)
    or, for anything nvJPEG cannot decode (PNG, CMYK JPEG), the image decoded here. The crop box and flip are
    drawn as the CPU path's transforms draw them for the same key (seeded global generator, the image's size read
    from its header), so both paths augment alike; validation's box is the resize-and-centre-crop's."""

    def __init__(self, dataset, image_size, train=True):
        super().__init__(dataset)
        self.image_size, self.train = image_size, train

    def __getitem__(self, key):  # validation's keys are bare indices: no draws
        return seeded_sample(self.dataset, key if isinstance(key, tuple) else (key, 0), read=self.read)

    def read(self, base, i):
        from torchvision.io import read_file
        label = base.targets[i]
        if hasattr(base, "encoded"):  # shards: JPEGs, sized in the index
            payload, jpeg, (height, width) = base.encoded(i), True, base.size(i)
        else:
            path = base.samples[i][0]
            height, width, jpeg = jpeg_header(path)
            payload = read_file(path) if jpeg else read_image(path)
        box, flip = crop_params(height, width, self.image_size, self.train)
        return payload, jpeg, label, box, flip


def crop_params(height, width, size, train):
    """(box, flip) for an image of height x width. Training: box ("crop", top, left, h, w), RandomResizedCrop's
    draw, then RandomHorizontalFlip's (p 0.5), from torch's global generator in that order, as transforms(size,
    True) draws them. Validation: box ("centre", h, w), the size the image is resized to (its shorter side 256/224
    of `size`, as v2.Resize computes it) before the centre crop; no draw."""
    import torchvision.transforms as T
    if train:
        top, left, h, w = T.RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(3, height, width),
                                                         scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        return ("crop", top, left, h, w), bool(torch.rand(1) < 0.5)
    short = int(size * 256 / 224)
    resized = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
    return ("centre", *resized), False


def collate_encoded(items):
    """A batch of EncodedSamples for the trip to the main process: every JPEG's bytes in one flat uint8 tensor
    (one shared-memory segment, not one per file) with their lengths; images the worker decoded (PNG, CMYK) as
    they are; labels as a tensor."""
    jpegs = [p for p, jpeg, *_ in items if jpeg]
    flat = torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8)
    decoded = [p for p, jpeg, *_ in items if not jpeg]
    labels = torch.tensor([label for _, _, label, _, _ in items])
    return (flat, [len(p) for p in jpegs], decoded, [jpeg for _, jpeg, *_ in items], labels,
            [box for *_, box, _ in items], [flip for *_, flip in items])


def gpu_batches(loader, data):
    """(uint8 NCHW, labels) on the device from a loader of EncodedSamples: JPEGs decoded as one batch on the
    device (nvJPEG on a GPU; the same call on a CPU device, which the tests use), then each image cropped and
    resized there (validation: resized, then centre-cropped) and flipped. Runs on the compute stream, one batch
    after the other with training (no lookahead)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as TF
    device, size = data.device, data.image_size
    for flat, lengths, decoded, is_jpeg, labels, boxes, flips in worker_errors_named(loader):
        if device.type == "cuda":  # nvJPEG writes on its own stream without waiting for ours (torchvision #9606):
            torch.cuda.current_stream(device).synchronize()  # memory freed by queued kernels must be free
        jpegs = iter(decode_jpeg(list(flat.split(lengths)), mode=ImageReadMode.RGB, device=device) if lengths else [])
        others = iter(decoded)
        out = []
        for jpeg, box, flip in zip(is_jpeg, boxes, flips):
            img = next(jpegs) if jpeg else next(others).to(device, non_blocking=True)
            if box[0] == "crop":  # training: the drawn box, resized to the output size
                img = TF.resized_crop(img, *box[1:], [size, size], antialias=True)
            else:  # validation (and training without augmentation): resized whole, then its centre
                img = TF.center_crop(TF.resize(img, list(box[1:]), antialias=True), [size, size])
            out.append(TF.horizontal_flip(img) if flip else img)
        yield torch.stack(out), labels.to(device, non_blocking=True)


# ---- to the device -------------------------------------------------------------------------------

def on_device(loader, device):
    """The loader's (x, y) batches on `device`. On CUDA the next batch's copy is issued on a side stream
    before the current batch is handed out, so host-to-device copies overlap the training step."""
    batches = worker_errors_named(loader)
    if device.type != "cuda":
        yield from ((x.to(device), y.to(device)) for x, y in batches)
        return
    stream = torch.cuda.Stream(device)

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


def worker_errors_named(loader):
    """The loader's batches; a DataError raised in a worker (which DataLoader re-raises with the worker's whole
    traceback as its message) comes back as its own one line."""
    try:
        yield from loader
    except DataError as e:
        raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
