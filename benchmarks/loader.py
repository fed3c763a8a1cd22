"""Images per second of ImageNet input pipelines, per CPU core and with N DataLoader workers.

    python -m benchmarks.loader [--workers 0 1 2] [--sizes 224 192 160] [--images 512] [--decode cuda]
                                [--json FILE] [--figure FILE]

On a generated ImageNet-like tree (made once and cached: 500x375 and larger photos-like JPEGs, quality 90, about
100 KB each), it times, for each crop size and worker count:
  conventional  torchvision ImageFolder, PIL decode and transforms (RandomResizedCrop, flip, ToTensor, Normalize)
                in the workers, float32 batches through shared memory: the usual ImageNet script
  ours          data/folder.py: torchvision.io decode and transforms.v2 on uint8 in the workers, uint8 batches
                (timed as far as the device: conversion and normalisation are the training device's, on a GPU)
  ours+norm     the same, and the float conversion and normalisation in the main process (on a CPU device: what
                a CPU-only run pays; on a GPU that work is the GPU's)
  ours-cuda     --decode cuda (a GPU only): workers read the bytes, the GPU decodes and augments each batch
  ours-shards   ours, reading the tree as `python shards.py` stores it (--short-side, default 256; prepared once
                and cached): smaller images, fewer pixels to decode
  conventional-resized  the conventional pipeline on those same smaller images (a tree of them): ours-shards'
                like-for-like reference
and the validation transform (resize 256/224, centre crop) of the first two. --workers 0 decodes in the main
process: the rate of one core. Each figure is the best of two passes of --batches batches of 64 in steady state
(after the workers' start and their 4 prefetched batches each, untimed). Then the reading alone, from a cold page
cache (each file evicted first): the training images' bytes in a shuffled order, one file each (the tree) and
from shards of the same bytes (prepared with every image stored as it is).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "cyclic-tradeoff", "loader-bench-v2")
# ImageNet's common shapes, and some larger (its mean JPEG is ~110 KB)
SIZES = [(500, 375), (375, 500), (500, 333), (500, 375), (333, 500), (640, 480), (800, 600)]


def photo(rng, width, height):
    """An RGB image with a photograph's spectrum (amplitude ~ 1/f, so JPEG compresses it like a photo, not like
    flat colour or white noise), uint8 (height, width, 3)."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    amplitude = 1 / np.maximum(np.hypot(fx, fy), 1 / max(width, height)) ** 1.25
    channels = []
    base = rng.standard_normal((height, width // 2 + 1)) + 1j * rng.standard_normal((height, width // 2 + 1))
    for c in range(3):  # correlated channels, as colour photos are
        own = rng.standard_normal(base.shape) + 1j * rng.standard_normal(base.shape)
        channels.append(np.fft.irfft2((0.8 * base + 0.45 * own) * amplitude, s=(height, width)))
    img = np.stack(channels, -1)
    img = (img - img.mean()) / (img.std() + 1e-9) * 52 + 118
    return np.clip(img, 0, 255).astype(np.uint8)


def make_tree(root, n_train, n_val, classes=10):
    """root/train/<class>/*.JPEG and root/val/<class>/*.JPEG, made once (a `complete` file marks a whole tree)."""
    from PIL import Image
    if os.path.exists(os.path.join(root, "complete")):
        return root
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            folder = os.path.join(root, split, f"c{i % classes:02d}")
            os.makedirs(folder, exist_ok=True)
            w, h = SIZES[i % len(SIZES)]
            Image.fromarray(photo(rng, w, h)).save(os.path.join(folder, f"{i:05d}.JPEG"), quality=90)
    open(os.path.join(root, "complete"), "w").close()
    return root


def conventional(root, split, size, train):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if train:
        t = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        t = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    return ImageFolder(os.path.join(root, split), T.Compose(t + [T.ToTensor(), T.Normalize(mean, std)]))


def time_batches(batches, warm):
    """Images per second over the batches after the first `warm` (the workers' start and their prefetched
    batches, which would otherwise be counted as if made in no time)."""
    it = iter(batches)
    for _ in range(warm):
        next(it)
    start, seen = time.perf_counter(), 0
    for x, _ in it:
        seen += len(x)
    return seen / (time.perf_counter() - start)


def prepared(root, short_side, quality=90):
    """The tree as shards.py stores it, beside the tree (made once; again if its settings or images differ)."""
    import shutil

    from data import prepare, shards
    out = f"{root}-shards{short_side}"
    try:
        with open(os.path.join(out, "val", "meta.json")) as f:
            meta = json.load(f)
    except OSError:
        meta = None
    images = sum(f.endswith(".JPEG") for _, _, fs in os.walk(os.path.join(root, "train")) for f in fs)
    if shards.settings(meta) != dict(version=shards.VERSION, short_side=short_side, quality=quality) or not (
            shards.is_prepared(out, "train") and not os.path.exists(os.path.join(out, shards.MARK))
            and shards.ShardSet(os.path.join(out, "train"), None).meta["images"] == images):
        shutil.rmtree(out, ignore_errors=True)
        prepare.prepare(root, out, short_side=short_side, quality=quality, workers=len(os.sched_getaffinity(0)),
                       progress=False)
    return out


def resized_tree(shards_root):
    """The shards' images written back as an ImageFolder tree (made once): the conventional pipeline on the
    same pixels as ours-shards."""
    import shards
    import shutil
    out = shards_root + "-tree"
    made_of = str([shards.ShardSet(os.path.join(shards_root, split), None).fingerprint() for split in ("train", "val")])
    try:
        with open(os.path.join(out, "complete")) as f:
            current = f.read() == made_of
    except OSError:
        current = False
    if not current:  # none yet, or of shards prepared since
        shutil.rmtree(out, ignore_errors=True)
        for split in ("train", "val"):
            s = shards.ShardSet(os.path.join(shards_root, split), None)
            for i, (path, _) in enumerate(s.samples):
                name = os.path.join(out, split, os.path.relpath(path, s.meta["source"]).split(os.sep, 1)[1])
                os.makedirs(os.path.dirname(name), exist_ok=True)
                with open(name, "wb") as f:
                    f.write(s.encoded(i).numpy().tobytes())
        with open(os.path.join(out, "complete"), "w") as f:
            f.write(made_of)
    return out


def evict(path):
    """Drops the file's pages from the page cache (the next read comes from the disk). Pages a process still
    maps are kept: drop the maps first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_rates(root, passes=2):
    """{storage: [(images/s, MB/s) per pass]}: the training images' bytes, read in a shuffled order from a cold
    page cache, file by file from the tree and from shards of the same bytes (every image stored as it is)."""
    import gc

    from data.folder import image_folder
    as_is = prepared(root, 1 << 20)
    tree, sharded = image_folder(root, "train", None), image_folder(as_is, "train", None)
    assert sharded.meta["stored"] == {"as-is": len(tree)}, "the shards hold other bytes than the tree"
    order = torch.randperm(len(tree), generator=torch.Generator().manual_seed(0)).tolist()
    shard_files = [os.path.join(sharded.folder, f) for f in os.listdir(sharded.folder) if f.startswith("shard-")]
    readers = {"folder": (lambda i: open(tree.samples[i][0], "rb").read(), [p for p, _ in tree.samples]),
               "shards": (lambda i: sharded.encoded(i).numpy(), shard_files)}
    rates = {}
    for name, (read, files) in readers.items():
        rates[name] = []
        for _ in range(passes):
            sharded.maps = (None, {})  # unmapped, so that eviction drops the pages
            gc.collect()
            for f in files:
                evict(f)
            start, total = time.perf_counter(), 0
            for i in order:
                total += len(read(i))
            took = time.perf_counter() - start
            rates[name].append((len(order) / took, total / took / 1e6))
    return rates


def measure(pipeline, root, size, train, workers, timed, device, batch=64):
    """Best of two passes: images per second of `pipeline` (conventional, ours, ours-cuda) in steady state: `timed`
    batches after 4 x workers + 1 (DataLoader's prefetch) untimed ones, over as many epochs of the tree as that
    takes."""
    from data.folder import EncodedSamples, FolderData, SeededSamples, gpu_batches
    warm = 4 * workers + 1
    total, best = warm + timed, 0.0
    for rep in range(2):
        g = torch.Generator().manual_seed(rep)
        if pipeline == "conventional":
            ds = conventional(root, "train" if train else "val", size, train)
            order = torch.cat([torch.randperm(len(ds), generator=g) for _ in range(-(-total * batch // len(ds)))])
            loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=order[:total * batch].tolist(),
                                                 num_workers=workers, pin_memory=device.type == "cuda",
                                                 prefetch_factor=4 if workers else None)
            batches = ((x.to(device, non_blocking=True), y) for x, y in loader)
        else:  # up to the uint8 batches the device receives (ours-cuda: decoded and augmented there)
            cuda = pipeline == "ours-cuda"
            data = FolderData(root, device, workers, size, augment=train, decode="cuda" if cuda else "cpu")
            if train:
                keys = data.train_loader(batch, 0, 1, seed=rep).keys
                index = [keys(s) for s in range(total)]  # across epochs: each its own order and draws
            else:
                n = len(data.val_set)
                index = [[((s * batch + i) % n, 0) for i in range(batch)] for s in range(total)]
            samples = (EncodedSamples if cuda else SeededSamples)(data.train_set if train else data.val_set, size,
                                                                  train=train)
            loader = data.loader(samples, index)
            if pipeline == "ours+norm":  # and the device's float conversion and normalisation, here on the CPU
                batches = data.batches_on_device(loader)
            else:
                batches = gpu_batches(loader, data) if cuda else ((x.to(device, non_blocking=True), y)
                                                                 for x, y in loader)
        rate = time_batches(batches, warm)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, rate)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=CACHE, help="the generated tree (made once)")
    p.add_argument("--images", type=int, default=512, help="images in the generated tree's train/ (val/: half)")
    p.add_argument("--batches", type=int, default=24, help="batches of 64 timed per pass, after the prefetched ones")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 192, 160])
    p.add_argument("--pipelines", nargs="+", default=["conventional", "ours", "ours+norm", "ours-shards",
                                                      "conventional-resized"])
    p.add_argument("--short-side", type=int, default=256, help="ours-shards: the stored images' shorter side")
    p.add_argument("--decode", choices=("cpu", "cuda"), default="cpu", help="cuda: also the GPU-decode pipeline")
    p.add_argument("--json", default=None)
    p.add_argument("--figure", default=None, help="img/s against workers (PNG)")
    a = p.parse_args(argv)
    device = torch.device("cuda" if a.decode == "cuda" else "cpu")
    pipelines = a.pipelines + (["ours-cuda"] if a.decode == "cuda" else [])
    root = make_tree(a.root, n_train=a.images, n_val=a.images // 2)
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, "train")) for f in fs]
    print(f"tree: {root}, {len(sizes)} training JPEGs, mean {np.mean(sizes) / 1e3:.0f} KB; "
          f"CPU: {torch.get_num_threads()} threads, {os.cpu_count()} cores; device {device}")
    torch.set_num_threads(1)  # the main process as one core, like a rank's own thread budget
    results = []
    for train, sizes_ in ((True, a.sizes), (False, a.sizes[:1])):
        for size in sizes_:
            for workers in a.workers:
                for pipeline in pipelines:
                    where = {"ours-shards": lambda: prepared(root, a.short_side),
                             "conventional-resized": lambda: resized_tree(prepared(root, a.short_side))}.get(
                        pipeline, lambda: root)()
                    rate = measure({"ours-shards": "ours", "conventional-resized": "conventional"}.get(
                        pipeline, pipeline), where, size, train, workers, a.batches, device)
                    row = dict(pipeline=pipeline, transform="train" if train else "val", size=size, workers=workers,
                               images_per_s=round(rate, 1))
                    results.append(row)
                    print(f"{row['transform']:>5} {size:>3} workers {workers}: {pipeline:<12} {rate:8.1f} img/s")
    reads = read_rates(root)
    for name, passes in reads.items():
        print(f"read, cold page cache, shuffled: {name:<7} " + ", ".join(f"{images:8.0f} img/s {mb:7.1f} MB/s"
                                                                          for images, mb in passes))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(cpu=cpu_name(), cores=os.cpu_count(), torch=torch.__version__, images=a.images,
                           mean_jpeg_kb=round(float(np.mean(sizes)) / 1e3, 1), short_side=a.short_side,
                           results=results, cold_reads={k: [dict(images_per_s=round(i), mb_per_s=round(m, 1)) for i, m in v]
                                                        for k, v in reads.items()}), f, indent=1)
    if a.figure:
        figure(results, a.figure)


def cpu_name():
    from options import hardware_name
    return hardware_name(torch.device("cpu"))


def figure(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for (pipeline, transform, size), colour in zip(
            sorted({(r["pipeline"], r["transform"], r["size"]) for r in results}), plt.cm.tab10.colors * 3):
        pts = sorted((r["workers"], r["images_per_s"]) for r in results
                     if (r["pipeline"], r["transform"], r["size"]) == (pipeline, transform, size))
        ax.plot(*zip(*pts), marker="o", color=colour, ls="-" if pipeline.startswith("ours") else "--",
                label=f"{pipeline} {transform} {size}")
    ax.set_xticks(sorted({r["workers"] for r in results}))
    ax.set_xlabel("DataLoader workers (0: the main process alone)")
    ax.set_ylabel("images / s")
    ax.set_title("ImageNet input pipelines on this CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    main()
