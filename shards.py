"""An ImageNet tree as a few large shard files, smaller images (FFCV's storage, read by the same loader).

    python shards.py SRC OUT [--short-side 256] [--quality 90] [--shard-mb 1024] [--workers N]

writes each split of the ImageFolder tree SRC (train/<class>/*, val/<class>/*) to OUT/<split>/: shard-*.bin (the
images' JPEG bytes, one after the other), index.npy (shard, offset, length, label, height, width per image),
paths.txt (each image's path under SRC, for messages) and meta.json (classes, settings; written last: a split
without it is unfinished). An image whose shorter side is above --short-side is resized to it and re-encoded at
--quality; a JPEG already small enough is stored as it is (so it decodes to the very same pixels); anything else
(PNG, CMYK) is re-encoded. Images keep ImageFolder's order, so a run on OUT draws the same images and crops per
step as a run on SRC, and is identical to it where no image was changed.

Why: decoding is most of an image's cost, and it scales with the pixels decoded (entropy decoding, not the
inverse DCT, dominates: decoding at 1/8 scale still costs two thirds of a full decode), so smaller stored images
are what makes each core deliver more; and a few large files replace a million small ones, whose opens and
metadata are what network filesystems are slow at. The price is resolution: a crop of a 256-pixel image is
upsampled where the original had the pixels. Train with `--data imagenet --data-dir OUT`.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

from data import DataError

VERSION = 1
COLUMNS = ("shard", "offset", "length", "label", "height", "width")
MARK = ".preparing"  # in OUT while it is written: what an interrupted prepare leaves, and may write over


def is_prepared(root, split):
    return os.path.exists(os.path.join(root, split, "meta.json"))


class ShardSet(torch.utils.data.Dataset):
    """One prepared split, as torchvision's ImageFolder serves a tree: (transform(image), label) per index, and
    .samples (source path, label), .targets, .classes. Shards are memory-mapped per process on first use (workers
    map their own)."""
    then = "prepare the shards again (shards.py), then continue with --resume"  # after a damaged image

    def __init__(self, folder, transform):
        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = json.load(f)
        if self.meta.get("version") != VERSION:
            raise DataError(f"--data-dir: {folder} was prepared by another version of shards.py "
                            f"({self.meta.get('version')}, this one reads {VERSION}); prepare it again")
        self.folder, self.transform, self.classes = folder, transform, self.meta["classes"]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.index = np.load(os.path.join(folder, "index.npy"))
        with open(os.path.join(folder, "paths.txt")) as f:
            paths = f.read().splitlines()
        self.targets = self.index[:, COLUMNS.index("label")].tolist()
        self.samples = [(os.path.join(self.meta["source"], path), label) for path, label in zip(paths, self.targets)]
        if len(self.samples) != len(self.index):
            raise DataError(f"--data-dir: {folder} has {len(self.index)} images in index.npy but {len(paths)} "
                            f"paths; prepare it again")
        self.maps = (None, {})  # (pid, {shard: memory map}): a forked worker maps its own

    def __len__(self):
        return len(self.index)

    def encoded(self, i):
        """Image i's stored JPEG bytes, a uint8 tensor (a copy: the map stays read-only)."""
        shard, offset, length = (int(v) for v in self.index[i, :3])
        if self.maps[0] != os.getpid():
            self.maps = (os.getpid(), {})
        maps = self.maps[1]
        if shard not in maps:
            maps[shard] = np.memmap(os.path.join(self.folder, f"shard-{shard:05d}.bin"), np.uint8, "r")
        return torch.from_numpy(np.array(maps[shard][offset:offset + length]))

    def size(self, i):
        """(height, width) of image i as stored."""
        return tuple(int(v) for v in self.index[i, 4:6])

    def __getitem__(self, i):
        from imagefolder import decode
        img = decode(self.encoded(i))
        return (self.transform(img) if self.transform else img), self.targets[i]


def encode_one(job):
    """(JPEG bytes, height, width, how) of one source image: stored as it is, resized, or re-encoded."""
    path, short_side, quality = job
    from PIL import Image
    from torchvision.io import encode_jpeg, read_file
    from torchvision.transforms.v2.functional import resize

    from imagefolder import raise_named, read_image
    try:
        with Image.open(path) as img:  # the header only
            width, height = img.size
            jpeg = img.format == "JPEG" and img.mode in ("RGB", "L")
        if jpeg and min(width, height) <= short_side:
            return read_file(path).numpy().tobytes(), height, width, "as-is"
        img, how = read_image(path), "re-encoded"
        if min(img.shape[1:]) > short_side:
            img, how = resize(img, short_side, antialias=True), "resized"
        return encode_jpeg(img, quality=quality).numpy().tobytes(), img.shape[1], img.shape[2], how
    except Exception as e:
        raise_named(e, path, "prepare again")


def prepare(src, out, short_side=256, quality=90, shard_mb=1024, workers=1, progress=True):
    """Write SRC's train/ and val/ to OUT as shards; returns {split: {how: count}}. Refuses an OUT that holds
    anything but an interrupted prepare's files."""
    from imagefolder import image_folder
    if os.path.exists(out) and os.listdir(out) and not os.path.exists(os.path.join(out, MARK)):
        raise DataError(f"shards.py: {out} exists and is not empty; choose a new OUT (nothing was written)")
    folders = {split: image_folder(src, split, None) for split in ("train", "val")}  # the tree checked first
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, MARK), "w").close()
    counts = {}
    import multiprocessing
    with multiprocessing.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for split, folder in folders.items():
            counts[split] = write_split(pool, folder, os.path.join(out, split), short_side, quality,
                                        shard_mb << 20, src, progress)
    os.remove(os.path.join(out, MARK))
    return counts


def write_split(pool, folder, dest, short_side, quality, shard_bytes, src, progress):
    from tqdm import tqdm
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(dest):  # an interrupted prepare's files (OUT carries the mark)
        os.remove(os.path.join(dest, name))
    index, how_many, shard, f = [], {}, -1, None
    jobs = [(path, short_side, quality) for path, _ in folder.samples]
    try:
        results = pool.imap(encode_one, jobs, chunksize=16)
        for (path, label), (data, height, width, how) in tqdm(zip(folder.samples, results), total=len(jobs),
                                                                desc=os.path.basename(dest), disable=not progress):
            if f is None or (f.tell() and f.tell() + len(data) > shard_bytes):
                if f is not None:
                    f.close()
                shard += 1
                f = open(os.path.join(dest, f"shard-{shard:05d}.bin"), "wb")
            index.append((shard, f.tell(), len(data), label, height, width))
            f.write(data)
            how_many[how] = how_many.get(how, 0) + 1
    finally:
        if f is not None:
            f.close()
    np.save(os.path.join(dest, "index.npy"), np.array(index, dtype=np.int64).reshape(-1, len(COLUMNS)))
    with open(os.path.join(dest, "paths.txt"), "w") as p:
        p.writelines(os.path.relpath(path, src) + "\n" for path, _ in folder.samples)
    meta = dict(version=VERSION, classes=folder.classes, images=len(index), short_side=short_side, quality=quality,
                source=os.path.abspath(src), stored=how_many)
    with open(os.path.join(dest, "meta.json"), "w") as m:  # last: the split is complete
        json.dump(meta, m, indent=1)
    return how_many


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("src", help="an ImageFolder tree with train/<class>/* and val/<class>/*")
    p.add_argument("out", help="a new (or empty) folder for the shards")
    p.add_argument("--short-side", type=int, default=256, help="larger images are resized so their shorter side is "
                   "this (FFCV stores ImageNet at 256-512)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    p.add_argument("--shard-mb", type=int, default=1024, help="shard file size")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="encoding processes")
    a = p.parse_args(argv)
    for ok, why in ((a.short_side >= 16, f"--short-side {a.short_side}: use at least 16 (e.g. 256)"),
                    (1 <= a.quality <= 100, f"--quality {a.quality}: use 1-100 (e.g. 90)"),
                    (a.shard_mb >= 1, f"--shard-mb {a.shard_mb}: use at least 1 (e.g. 1024)"),
                    (a.workers >= 1, f"--workers {a.workers}: use at least 1")):
        if not ok:
            sys.exit(f"shards.py: {why}")
    try:
        counts = prepare(a.src, a.out, a.short_side, a.quality, a.shard_mb, a.workers)
    except DataError as e:
        sys.exit(str(e))
    for split, how in counts.items():
        print(f"{split}: {sum(how.values())} images ({', '.join(f'{n} {k}' for k, n in sorted(how.items()))})")


if __name__ == "__main__":
    main()
