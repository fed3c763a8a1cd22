"""An ImageNet tree as a few large shard files, smaller images (FFCV's storage, read by the same loader).

    python shards.py SRC OUT [--short-side 256] [--quality 90] [--shard-mb 1024] [--workers N]

(the top-level shards.py runs this module) writes each split of the ImageFolder tree SRC (train/<class>/*,
val/<class>/*) to OUT/<split>/ (data/shards.py reads them): shard-*.bin (the images' JPEG bytes, one after the
other), index.npy (shard, offset, length, label, height, width per image), paths.txt (each image's path under SRC,
for messages) and meta.json (classes, settings, each shard's size, the CRC-32 of index.npy's table; written last: a
split without it is unfinished). A run checks index.npy against that CRC and its labels against the classes, so
that an index edited after preparing never trains on wrong labels. An image whose shorter side is above
--short-side is resized to it and re-encoded at --quality; a JPEG already small enough is stored as it is (so it
decodes to the very same pixels; it is decoded once here, so a damaged one is found now, not hours into a run);
anything else (PNG, CMYK) is re-encoded. Images keep ImageFolder's order, so a run on OUT draws the same images and
crops per step as a run on SRC, and is identical to it where no image was changed.

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

from data.common import DataError
from data.folder import open_splits
from data.images import decode, jpeg_header, raise_named
from data.shards import COLUMNS, MARK, VERSION, ShardSet, is_prepared, settings, table_crc32
from rundir import fsync_dir


def encode_one(job):
    """(JPEG bytes, height, width, how) of one source image: stored as it is, resized, or re-encoded."""
    path, short_side, quality = job
    from torchvision.io import encode_jpeg, read_file
    from torchvision.transforms.v2.functional import resize
    try:
        height, width, jpeg = jpeg_header(path)
        data = read_file(path)
        img = decode(data)  # a damaged file is named now (stored as it is too)
        if jpeg and min(width, height) <= short_side:
            return data.numpy().tobytes(), height, width, "as-is"
        how = "re-encoded"
        if min(img.shape[1:]) > short_side:
            img, how = resize(img, short_side, antialias=True), "resized"
        return encode_jpeg(img, quality=quality).numpy().tobytes(), img.shape[1], img.shape[2], how
    except Exception as e:
        raise_named(e, path, "prepare again", option="SRC")


def prepare(src, out, short_side=256, quality=90, shard_mb=1024, workers=1, progress=True):
    """Write SRC's train/ and val/ to OUT as shards; returns {split: {how: count}}. Refuses an OUT that holds
    anything but an interrupted prepare's files, or one another prepare is writing (OUT itself is locked: the
    checks are made under the lock). An interrupted prepare is continued: a split it finished with these settings
    is kept, the other written again."""
    import fcntl
    import multiprocessing
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"OUT: {out} is a file; choose a new folder")
    if is_prepared(src, "train") or is_prepared(src, "val"):
        raise DataError(f"SRC: {src} is itself shards.py's output; prepare from the ImageFolder tree it was made of")
    folders = dict(zip(("train", "val"), open_splits(src, None, None, option="SRC")))  # the tree checked first
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    lock = os.open(out, os.O_RDONLY)  # the folder, which no prepare removes (MARK comes and goes)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"OUT: {out} is being written by another shards.py now; wait for it or choose another "
                            f"folder") from None
        except OSError as e:  # Lustre or NFS mounted without lock support
            raise DataError(f"OUT: {out}: its file system cannot lock files ({e.strerror or e}); prepare on a local "
                            f"disk and copy OUT over") from None
        if os.listdir(out) and not os.path.exists(os.path.join(out, MARK)):
            raise DataError(f"OUT: {out} exists and is not empty; choose a new folder (nothing was written)")
        open(os.path.join(out, MARK), "w").close()
        counts = {}
        with multiprocessing.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for split, folder in folders.items():
                counts[split] = write_split(pool, folder, os.path.join(out, split), short_side, quality,
                                            shard_mb << 20, src, progress)
        os.remove(os.path.join(out, MARK))
        fsync_dir(out)
    except BaseException:
        if created and os.listdir(out) == []:
            os.rmdir(out)
        raise
    finally:
        os.close(lock)
    return counts


def finished(dest, folder, short_side, quality, src):
    """The stored counts of a split an interrupted prepare finished with these settings from this tree, or None."""
    try:
        done = ShardSet(dest, None)
    except (OSError, ValueError, KeyError, DataError):
        return None
    same = settings(done.meta) == dict(version=VERSION, short_side=short_side, quality=quality)
    ok = same and done.meta["source"] == os.path.abspath(src) and done.samples == [
        (os.path.join(os.path.abspath(src), os.path.relpath(p, src)), label) for p, label in folder.samples]
    return done.meta["stored"] if ok else None


def write_split(pool, folder, dest, short_side, quality, shard_bytes, src, progress):
    """One split's shards, index and paths, made durable, then its meta.json (atomically: the split is complete)."""
    import shutil

    from tqdm import tqdm
    kept = finished(dest, folder, short_side, quality, src)
    if kept is not None:
        return kept
    shutil.rmtree(dest, ignore_errors=True)  # an interrupted prepare's (OUT carries the mark; we hold OUT)
    os.makedirs(dest)
    index, how_many, sizes, f = [], {}, [], None
    jobs = [(path, short_side, quality) for path, _ in folder.samples]

    def close(f):
        f.flush()
        os.fsync(f.fileno())
        sizes.append(f.tell())
        f.close()
    try:
        results = pool.imap(encode_one, jobs, chunksize=16)
        for (path, label), (data, height, width, how) in tqdm(zip(folder.samples, results), total=len(jobs),
                                                                desc=os.path.basename(dest), disable=not progress):
            if f is None or (f.tell() and f.tell() + len(data) > shard_bytes):
                if f is not None:
                    close(f)
                f = open(os.path.join(dest, f"shard-{len(sizes):05d}.bin"), "wb")
            index.append((len(sizes), f.tell(), len(data), label, height, width))
            f.write(data)
            how_many[how] = how_many.get(how, 0) + 1
        if f is not None:
            close(f)
    finally:
        if f is not None and not f.closed:
            f.close()
    table = np.array(index, dtype=np.int64).reshape(-1, len(COLUMNS))
    write_durably(os.path.join(dest, "index.npy"), lambda o: np.save(o, table))
    write_durably(os.path.join(dest, "paths.txt"), lambda o: o.write(
        "".join(os.path.relpath(path, src) + "\n" for path, _ in folder.samples).encode("utf-8", "surrogateescape")))
    meta = dict(version=VERSION, classes=folder.classes, images=len(index), short_side=short_side, quality=quality,
                source=os.path.abspath(src), stored=how_many, shard_bytes=sizes, index_crc32=table_crc32(table))
    write_durably(os.path.join(dest, "meta.json"), lambda o: o.write(json.dumps(meta, indent=1).encode()))
    fsync_dir(dest)
    return how_many


def write_durably(path, write):
    """write(binary file) to path.tmp, synced, then renamed over path: path is whole or absent."""
    with open(path + ".tmp", "wb") as o:
        write(o)
        o.flush()
        os.fsync(o.fileno())
    os.replace(path + ".tmp", path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("src", help="an ImageFolder tree with train/<class>/* and val/<class>/*")
    p.add_argument("out", help="a new (or empty) folder for the shards")
    p.add_argument("--short-side", type=int, default=256, help="larger images are resized so their shorter side is "
                   "this (FFCV stores ImageNet at 256-512); at least the --image-size you evaluate at x 256/224")
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
        sys.exit(f"shards.py: {e}")
    except OSError as e:  # the file system's (permissions, space): nothing to do with an image
        sys.exit(f"shards.py: {e.strerror or e}: {e.filename or ''} (SRC {a.src}, OUT {a.out})")
    for split, how in counts.items():
        print(f"{split}: {sum(how.values())} images ({', '.join(f'{n} {k}' for k, n in sorted(how.items()))})")


if __name__ == "__main__":
    main()
