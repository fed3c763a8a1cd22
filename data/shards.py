"""Shards (data/prepare.py writes them: `python shards.py`), read as an ImageFolder tree is: each split of OUT is
shard-*.bin (the images' JPEG bytes, one after the other), index.npy (shard, offset, length, label, height, width per
image), paths.txt (each image's path under the source tree, for messages) and meta.json (classes, settings, each
shard's size, the CRC-32 of index.npy's table; written last: a split without it is unfinished). A run checks
index.npy against that CRC and its labels against the classes, so that an index edited after preparing never trains
on wrong labels."""
import json
import os
import zlib

import numpy as np
import torch

from data.common import DataError
from data.images import decode

VERSION = 2  # 2: meta.json records each shard's size
COLUMNS = ("shard", "offset", "length", "label", "height", "width")
MARK = ".preparing"  # in OUT while it is written (locked by the writer): an interrupted prepare leaves it
SETTINGS = ("version", "short_side", "quality")


def is_prepared(root, split):
    return os.path.exists(os.path.join(root, split, "meta.json"))


def settings(meta):
    """How a split was stored: "folder" (not shards), or the settings that decide its pixels."""
    return "folder" if meta is None else {k: meta.get(k) for k in SETTINGS}


def storage(meta):
    """config.json's data_storage: "folder", or the shards' settings and counts (what a resume must find again)."""
    return "folder" if meta is None else {k: v for k, v in meta.items() if k not in ("classes", "source",
                                                                                       "shard_bytes", "index_crc32")}


class ShardSet(torch.utils.data.Dataset):
    """One prepared split, as torchvision's ImageFolder serves a tree: (transform(image), label) per index, and
    .samples (source path, label), .targets, .classes. Shards are memory-mapped per process on first use (workers
    map their own; a pickled ShardSet carries no maps)."""
    then = "run shards.py SRC OUT again (remove OUT first), then continue with --resume"  # after a damaged image

    def __init__(self, folder, transform, option="--data-dir"):
        with open(os.path.join(folder, "meta.json")) as f:
            self.meta = json.load(f)
        again = "remove it and run shards.py again"
        if self.meta.get("version") != VERSION:
            raise DataError(f"{option}: {folder} was prepared by another version of shards.py "
                            f"({self.meta.get('version')}, this one reads {VERSION}); {again}")
        for shard, size in enumerate(self.meta["shard_bytes"]):  # a copy still under way, or cut short
            name = os.path.join(folder, f"shard-{shard:05d}.bin")
            have = os.path.getsize(name) if os.path.exists(name) else None
            if have != size:
                raise DataError(f"{option}: {name} is {'missing' if have is None else f'{have} bytes'}, its index "
                                f"needs {size} bytes; copy {os.path.dirname(folder)} again (or {again})")
        self.folder, self.transform, self.classes = folder, transform, self.meta["classes"]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.index = np.load(os.path.join(folder, "index.npy"))
        with open(os.path.join(folder, "paths.txt"), encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            paths = f.read().split("\n")[:-1]  # file names may hold any character but a newline
        if self.index.ndim != 2 or self.index.shape[1] != len(COLUMNS) or self.index.dtype.kind not in "iu":
            raise DataError(f"{option}: {folder}/index.npy is a {self.index.dtype} table of shape {self.index.shape}, "
                            f"not the {len(COLUMNS)} integer columns shards.py writes; {again}")
        if len(paths) != len(self.index):
            raise DataError(f"{option}: {folder} has {len(self.index)} images in index.npy but {len(paths)} paths; "
                            f"{again}")
        shard, offset, length = (self.index[:, k] for k in range(3))
        sizes = np.array(self.meta["shard_bytes"] + [0])
        if self.meta["images"] != len(self.index) or len(self.index) and (
                shard.min() < 0 or shard.max() >= len(self.meta["shard_bytes"]) or offset.min() < 0
                or (offset + length > sizes[shard]).any()):
            raise DataError(f"{option}: {folder}'s index.npy does not fit its meta.json and shards (files of two "
                            f"prepares?); {again}")
        labels = self.index[:, COLUMNS.index("label")]
        bad = np.flatnonzero((labels < 0) | (labels >= len(self.classes)))
        if len(bad):
            raise DataError(f"{option}: {folder}/index.npy row {bad[0]} has label {labels[bad[0]]}, outside its "
                            f"meta.json's {len(self.classes)} classes (0-{len(self.classes) - 1}); {again}")
        self.crc32 = table_crc32(self.index)
        recorded = self.meta.get("index_crc32")  # (None: prepared before shards.py recorded it)
        if recorded is not None and recorded != self.crc32:
            raise DataError(f"{option}: {folder}/index.npy was changed after shards.py wrote it (CRC-32 {self.crc32}, "
                            f"meta.json records {recorded}): its labels or order may be wrong; {again}")
        self.targets = labels.tolist()
        self.samples = [(os.path.join(self.meta["source"], path), label) for path, label in zip(paths, self.targets)]
        self.maps = (None, {})  # (pid, {shard: memory map}): a forked worker maps its own

    def fingerprint(self):
        """crc32 of index.npy's table: which bytes of which shards, and the labels (a prepare from another tree,
        or another encoder, gives another)."""
        return self.crc32

    def where(self, i):
        """Image i as stored, for messages: its bytes in its shard (the source file may be whole)."""
        shard, offset, length = (int(v) for v in self.index[i, :3])
        return (f"image {i} of {self.folder} as stored (shard-{shard:05d}.bin, bytes {offset}-{offset + length}; "
                f"index.npy row {i})")

    def __getstate__(self):
        return dict(self.__dict__, maps=(None, {}))

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
        img = decode(self.encoded(i))
        return (self.transform(img) if self.transform else img), self.targets[i]


def table_crc32(table):
    """CRC-32 of index.npy's table (its int64 values in order): meta.json records it, a run compares it."""
    return zlib.crc32(np.ascontiguousarray(table, dtype=np.int64).tobytes())
