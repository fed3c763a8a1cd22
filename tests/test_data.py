"""Data: the resident fast path sees every image once per epoch, augments within bounds into NCHW batches;
loaders for Fashion-MNIST IDX, CIFAR and ImageFolder trees work from local copies and refuse bad ones; the
folder path draws its augmentation per rank and repeats it exactly on resume."""
import gzip
import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data import FASHION_MNIST_SYSTEM_DIR, DataError, ResidentData, build_data

CPU = torch.device("cpu")


def resident(n=96, size=6, pad=2, flip=True):
    x = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(size, 2).repeat(size, 3)  # image i is all i
    y = np.arange(n) % 10
    return ResidentData(x, y, x[:8], y[:8], (0.0,), (1 / 255,), CPU, pad, flip, 10)


def nchw_strides(x):
    """The strides of a freshly allocated NCHW tensor of x's shape."""
    return torch.empty(x.shape).stride()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_image_once_per_epoch_per_rank_set_with_aligned_labels(world):
    data = resident(n=100)
    batch = 12  # 8 full steps per epoch, 4 images dropped
    seen = []
    for rank in range(world):
        loader = data.train_loader(batch, rank, world, seed=5)
        assert loader.steps_per_epoch == 8
        for x, y in loader.epoch(3):
            assert len(x) == batch // world
            centre = x[:, 0, 3, 3].round().long()  # the centre pixel survives a 2-pixel shift: the image id
            assert torch.equal(y, centre % 10)
            seen += centre.tolist()
    assert len(seen) == len(set(seen)) == 96
    # the order depends on (seed, epoch) only: another epoch is another permutation, the same epoch the same
    first = lambda ep: next(data.train_loader(batch, 0, 1, seed=5).epoch(ep))[1]
    assert torch.equal(first(3), first(3)) and not torch.equal(first(3), first(4))


def test_world_size_does_not_change_the_global_batch():
    data = resident(n=48)
    single = torch.cat([x for x, _ in data.train_loader(12, 0, 1, 0).epoch(0)])
    parts = [list(data.train_loader(12, r, 2, 0).epoch(0)) for r in range(2)]
    double = torch.cat([torch.cat([parts[0][s][0], parts[1][s][0]]) for s in range(4)])
    assert torch.equal(single, double)


def test_resume_mid_epoch_yields_the_remaining_batches():
    data = resident(n=48)
    full = list(data.train_loader(8, 0, 1, 1).epoch(2))
    rest = list(data.train_loader(8, 0, 1, 1).epoch(2, start_step=4))
    assert len(rest) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(full[4:], rest))


def reference_crop_flip(img, dy, dx, pad, flip):
    """One (C, H, W) image shifted by (dy, dx) with zero fill, then mirrored: the textbook random crop."""
    _, h, w = img.shape
    crop = F.pad(img, (pad, pad, pad, pad))[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w]
    return crop.flip(2) if flip else crop


@pytest.mark.parametrize("chans,size,pad,flip", [(1, 28, 2, True), (3, 32, 4, True), (1, 28, 0, True),
                                                 (3, 32, 4, False), (3, 32, 0, False)])
def test_batches_are_nchw_and_crops_equal_a_per_image_reference(chans, size, pad, flip):
    n = 40
    g = np.random.default_rng(0)
    x = g.integers(1, 256, (n, chans, size, size)).astype(np.uint8)  # no zeros: padding is recognisable
    data = ResidentData(x, np.arange(n) % 10, x[:10], np.arange(10), (0.5,) * chans, (0.25,) * chans, CPU, pad,
                        flip, 10)
    xt = torch.as_tensor(x)
    shifts = torch.randint(-pad, pad + 1, (n, 2), generator=torch.Generator().manual_seed(0))
    flips = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.5
    out = data.augment(xt, shifts, flips)
    for i in range(n):
        dy, dx = shifts[i].tolist()
        assert torch.equal(out[i], reference_crop_flip(xt[i], dy, dx, pad, flip and bool(flips[i])))
    assert (shifts != 0).any() == (pad > 0) and flips.any()  # the draws did move and mirror images
    assert out.stride() == nchw_strides(out)
    # channels-last batches would make mkldnn run the baseline model channels-last
    train_x, _ = next(data.train_loader(16, 0, 1, seed=0).epoch(0))
    val_x, _ = next(data.val_batches(0, 1, 16))
    assert train_x.stride() == nchw_strides(train_x) and val_x.stride() == nchw_strides(val_x)


def test_augment_none_trains_on_the_images_as_evaluated():
    """--augment none: every training image is an original image normalised, no shift or flip."""
    plain = build_data("synthetic", None, CPU, augment=False)
    assert (plain.pad, plain.flip) == (0, False)
    x = torch.randint(0, 256, (64, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy()
    for pad, flip, all_original in ((0, False, True), (2, True, False)):  # (standard: shifted or flipped)
        data = ResidentData(x, np.arange(64) % 10, x[:8], np.arange(8), (0.5,), (0.25,), CPU, pad, flip, 10)
        originals = data.normalize(data.train_x)
        batch = next(data.train_loader(16, 0, 1, seed=3).epoch(0))[0]
        found = [((originals - img).abs().flatten(1).amax(1) < 1e-6).any().item() for img in batch]
        assert all(found) == all_original


# ---- Fashion-MNIST and CIFAR files ---------------------------------------------------------

@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_SYSTEM_DIR), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_system_files_hold_the_known_first_image():
    data = build_data("fashion-mnist", None, CPU)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.val_x.shape == (10000, 1, 28, 28)
    first = data.train_x[0, 0].long()
    assert data.train_y[0] == 9  # an ankle boot
    assert first.sum() == 76247 and first[10, 13] == 193 and first[0, 0] == 0 and first.max() == 255
    assert data.val_y[0] == 9 and data.val_x[0].long().sum() == 33456
    assert torch.bincount(data.train_y).tolist() == [6000] * 10


def write_idx(path, array, gz=True):
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 | array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder, n_train=20, n_val=7):
    g = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_val)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", g.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", g.integers(0, 10, n))


def test_fashion_mnist_from_data_dir(tmp_path):
    write_fashion_mnist(tmp_path)
    data = build_data("fashion-mnist", str(tmp_path), CPU)
    assert data.train_x.shape == (20, 1, 28, 28) and data.val_x.shape == (7, 1, 28, 28) and data.num_classes == 10
    with pytest.raises(DataError, match="--data-dir: no Fashion-MNIST IDX files"):
        build_data("fashion-mnist", str(tmp_path / ".."), CPU)


def truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def raw_and_truncated(path):
    """Replaces the gzipped file by a raw IDX file that misses its last bytes."""
    raw = gzip.decompress(path.read_bytes())
    path.unlink()
    path.with_suffix("").write_bytes(raw[:-100])


BAD_FILES = {  # what is wrong: (file, how to break it, what the message says)
    "short labels": ("t10k-labels-idx1-ubyte.gz", lambda p: write_idx(p, np.zeros(5)), "holds 5 labels for the 7 "),
    "wrong size": ("train-images-idx3-ubyte.gz", lambda p: write_idx(p, np.zeros((20, 20, 20))), r"shape \(20, 20\)"),
    "label range": ("train-labels-idx1-ubyte.gz", lambda p: write_idx(p, np.full(20, 10)), "label 10, outside 0..9"),
    "truncated gz": ("train-images-idx3-ubyte.gz", truncate, "cannot read .*Compressed file ended"),
    "not gzip": ("t10k-images-idx3-ubyte.gz", lambda p: p.write_bytes(b"<html>not found</html>"), "cannot read"),
    "truncated raw": ("train-images-idx3-ubyte.gz", raw_and_truncated, "truncated or corrupt: .* 20 x 28 x 28 = 15680 "
                                                                       "bytes, it holds 15580"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_fashion_mnist_bad_files_are_one_line_naming_the_file(tmp_path, case):
    name, damage, says = BAD_FILES[case]
    write_fashion_mnist(tmp_path)
    damage(tmp_path / name)
    with pytest.raises(DataError, match=says) as e:
        build_data("fashion-mnist", str(tmp_path), CPU)
    message = str(e.value)
    assert "\n" not in message and message.startswith("--data-dir: ") and name.removesuffix(".gz") in message
    if case in ("truncated gz", "not gzip", "truncated raw"):
        assert "apt-get install --reinstall dataset-fashion-mnist" in message


def write_cifar10(tmp_path, monkeypatch, test_labels=None):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    g = np.random.default_rng(0)

    def batch(name, n, labels=None):
        with open(root / name, "wb") as f:
            labels = list(g.integers(0, 10, n)) if labels is None else labels
            pickle.dump({"data": g.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": labels}, f)
    for i in range(1, 6):
        batch(f"data_batch_{i}", 4)
    batch("test_batch", 3, test_labels)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # our tiny tree has no real checksums
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)


def test_cifar10_from_torchvision_layout(tmp_path, monkeypatch):
    write_cifar10(tmp_path, monkeypatch)
    data = build_data("cifar10", str(tmp_path), CPU)
    assert data.train_x.shape == (20, 3, 32, 32) and data.val_x.shape == (3, 3, 32, 32)
    x, y = next(data.train_loader(4, 0, 1, 0).epoch(0))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and x.stride() == nchw_strides(x)


@pytest.mark.parametrize("labels,says", [([1, 2], "holds 2 labels for the 3 images"), ([1, 2, 10], "has label 10")])
def test_cifar10_labels_that_do_not_add_up_are_refused(tmp_path, monkeypatch, labels, says):
    write_cifar10(tmp_path, monkeypatch, test_labels=labels)
    with pytest.raises(DataError, match=r"cifar-10-batches-py \(test batches\) " + says):
        build_data("cifar10", str(tmp_path), CPU)


# ---- ImageFolder trees ---------------------------------------------------------------------

def write_images(folder, ids, pixels, ext="png"):
    """Saves image i of `ids` as folder/i.ext with the pixels pixels(i) (H, W, 3 uint8)."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.fromarray(pixels(i)).save(folder / f"{i}.{ext}")


def write_image_folder(root, per_class, classes=("a", "b"), pixels=lambda i: np.full((8, 8, 3), i, np.uint8)):
    """root/train/<class>/ and root/val/<class>/ with per_class = {"train": n, "val": m} images per class."""
    for split, n in per_class.items():
        for k, cls in enumerate(classes):
            write_images(root / split / cls, range(k * n, (k + 1) * n), pixels)


class Recording(torch.utils.data.Dataset):
    """A dataset that records every index it is asked for."""

    def __init__(self, inner):
        self.inner, self.loaded = inner, []

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.loaded.append(i)
        return self.inner[i]


def test_imagenet_from_image_folder(tmp_path):
    g = np.random.default_rng(0)
    write_image_folder(tmp_path, {"train": 6, "val": 2}, pixels=lambda i: g.integers(0, 256, (40, 50, 3), np.uint8))
    data = build_data("imagenet", str(tmp_path), CPU, workers=0)
    assert data.num_classes == 2
    loader = data.train_loader(4, 0, 1, 0)
    assert loader.steps_per_epoch == 3
    x, y = next(loader.epoch(0))
    assert x.shape == (4, 3, 224, 224) and x.stride() == nchw_strides(x)
    val = list(data.val_batches(0, 2, 250)) + list(data.val_batches(1, 2, 250))
    assert val[0][0].stride() == nchw_strides(val[0][0]) and val[0][0].shape[1:] == (3, 224, 224)
    # sharded, no repeats: every validation image once, with its own label (contents: test_evaluation.py)
    assert sorted(int(v) for _, yb in val for v in yb) == [0, 0, 1, 1]
    assert len({round(float(xb[i].sum()), 2) for xb, _ in val for i in range(len(xb))}) == 4


def test_image_folder_resume_mid_epoch_skips_decoding(tmp_path):
    """A resumed epoch yields the rest of the same order and never loads the finished steps' images."""
    write_image_folder(tmp_path, {"train": 4, "val": 4}, classes=("0", "1", "2"))
    data = build_data("imagenet", str(tmp_path), CPU, workers=0)
    data.train_set = recording = Recording(data.train_set)
    loader = data.train_loader(4, 0, 1, seed=5)
    full = [y.tolist() for _, y in loader.epoch(2)]
    order = list(recording.loaded)
    recording.loaded.clear()
    rest = [y.tolist() for _, y in loader.epoch(2, start_step=2)]
    assert len(full) == 3 and rest == full[2:]
    assert recording.loaded == order[8:]  # only the last step's 4 images were read
    with pytest.raises(DataError, match="has no train/ folder"):
        build_data("imagenet", str(tmp_path / "train"), CPU)


def test_image_folder_shards_of_two_ranks_make_the_global_batch(tmp_path):
    write_image_folder(tmp_path, {"train": 7, "val": 1})  # 14 images, batch 4: 3 steps, 2 images left out
    data = build_data("imagenet", str(tmp_path), CPU, workers=0)
    targets = data.train_set.targets
    data.train_set = recording = Recording(data.train_set)

    def epoch(rank, world):
        """Per step, the indices this rank loaded, checked against the labels it yielded."""
        steps = []
        for _, y in data.train_loader(4, rank, world, seed=3).epoch(1):
            steps.append(recording.loaded[-len(y):])
            assert y.tolist() == [targets[i] for i in steps[-1]]
        return steps
    single, rank0, rank1 = epoch(0, 1), epoch(0, 2), epoch(1, 2)
    union = [i for step in rank0 + rank1 for i in step]
    assert len(union) == len(set(union)) == 12 and set(union) <= set(range(14))
    assert [sorted(a + b) for a, b in zip(rank0, rank1)] == [sorted(s) for s in single]


def test_image_folder_draws_differ_across_ranks_and_repeat_exactly_on_resume(tmp_path):
    """Every image is the same gradient, so outputs differ only by their crop and flip."""
    gradient = np.arange(24 * 32 * 3, dtype=np.uint32).reshape(24, 32, 3) % 251
    write_image_folder(tmp_path, {"train": 8, "val": 1}, pixels=lambda i: gradient.astype(np.uint8))
    data = build_data("imagenet", str(tmp_path), CPU, workers=0)
    full = {}
    for rank in (0, 1):
        torch.manual_seed(0)  # every rank seeds its global generator alike (train.py does)
        loader = data.train_loader(4, rank, 2, seed=7)
        state = torch.get_rng_state()
        full[rank] = list(loader.epoch(1))
        assert torch.equal(torch.get_rng_state(), state)  # loading leaves the training process's draws alone
        torch.manual_seed(123)  # a resumed process is elsewhere in its stream
        rest = list(loader.epoch(1, start_step=2))
        assert len(rest) == 2 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                      for a, b in zip(full[rank][2:], rest))
    images = [x for rank in (0, 1) for batch, _ in full[rank] for x in batch]
    assert len(images) == 16 and len({x.numpy().tobytes() for x in images}) == 16
    # decoded in worker processes: the same tensors, on resume too
    in_workers = build_data("imagenet", str(tmp_path), CPU, workers=2).train_loader(4, 1, 2, seed=7)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[1][1:], in_workers.epoch(1, start_step=1)))


def test_image_folder_subset_is_a_fixed_random_draw_over_all_classes(tmp_path):
    write_image_folder(tmp_path, {"train": 4, "val": 1}, classes=("a", "b", "c", "d", "e"))
    subsets = [build_data("imagenet", str(tmp_path), CPU, subset=6, workers=0).train_set for _ in range(2)]
    assert subsets[0].indices == subsets[1].indices and len(subsets[0]) == 6
    assert len({subsets[0].dataset.targets[i] for i in subsets[0].indices}) >= 3  # not class 0's first images


def test_image_folder_flat_or_mismatched_val_is_refused(tmp_path):
    write_image_folder(tmp_path, {"train": 2}, classes=("a", "b", "c"))
    write_images(tmp_path / "val", range(3), lambda i: np.zeros((8, 8, 3), np.uint8), ext="JPEG")
    with pytest.raises(DataError, match=r"val has no class folders; .*val/<class>/\*\.JPEG.*valprep") as e:
        build_data("imagenet", str(tmp_path), CPU)
    assert "\n" not in str(e.value)
    for cls in ("a", "b", "d"):
        write_images(tmp_path / "val" / cls, range(1), lambda i: np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"different class folders \(only in train/: c; only in val/: d\)"):
        build_data("imagenet", str(tmp_path), CPU)


def test_benchmark_compares_like_with_like(tmp_path):
    """(a) compute limit, (b) train.py's loop and (c) the DataLoader pipeline must run the same model, batch,
    precision, layout and image shape, or their ratios mean nothing; they are interleaved over rounds, and b/a is
    the median of each round's own ratio."""
    out = tmp_path / "bench.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for flags in ([], ["--channels-last", "--amp", "none"]):
        subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--steps", "2", "--batch-size", "32", "--rounds",
                        "2", "--json", str(out)] + flags, cwd=root, check=True, capture_output=True, timeout=600)
        figures = json.loads(out.read_text())
        rounds = {k: figures["figures"][k]["rounds"] for k in "abc"}  # interleaved rounds; b/a taken round by round
        assert all(len(r) == 2 for r in rounds.values())
        assert figures["b_over_a"] == pytest.approx(sum(b / a for a, b in zip(rounds["a"], rounds["b"])) / 2)
        ran = figures["ran"]  # what each measurement's first convolution saw, in its forward pass
        assert ran["a"] == ran["b"] == ran["c"], ran
        assert ran["a"]["batch_size"] == 32 and ran["a"]["shape"] == [1, 28, 28]
        assert ran["a"]["device"] == figures["device_type"] == "cpu"  # the tests hide any GPU
        assert ran["a"]["channels_last"] == ("--channels-last" in flags)
        assert (ran["a"]["amp"] == "none") if flags else ran["a"]["amp"] == figures["amp"] in ("bf16", "none")
        assert all(figures[k] > 0 for k in ("a_img_s", "b_img_s", "c_img_s"))


@pytest.mark.parametrize("split,damage", [("train", "truncated"), ("val", "not an image")])
def test_a_damaged_image_stops_the_run_with_one_line_naming_it(tmp_path, split, damage):
    """Read by a DataLoader worker mid-run, a damaged file is one line naming it (not the worker's traceback),
    exit 2; the folder keeps its checkpoint to resume from once the file is replaced."""
    from conftest import run_train
    g = np.random.default_rng(0)
    write_image_folder(tmp_path / "tree", {"train": 4, "val": 2},
                       pixels=lambda i: g.integers(0, 256, (40, 50, 3), np.uint8))
    bad = tmp_path / "tree" / split / "b" / ("5.png" if split == "train" else "3.png")
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.write_text("this is not an image\n")
    run = tmp_path / "run"
    p = run_train(["--data", "imagenet", "--data-dir", str(tmp_path / "tree"), "--workers", "1", "--batch-size", "4",
                   "--warmup-epochs", "1", "--t0", "1", "--cycles", "1", "--amp", "none", "--no-progress",
                   "--run-dir", str(run)], check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-3000:]
    assert err[0].startswith("train.py: error: --data-dir: error while reading") and str(bad) in err[0], err
    assert "--resume" in err[0] and not (run / "done").exists()
