"""Data: the resident fast path sees every image once per epoch, augments within bounds; loaders for
Fashion-MNIST IDX, CIFAR and ImageFolder trees work from local copies."""
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

from data import DataError, ResidentData, build_data


def resident(n=96, size=6, pad=2, flip=True):
    x = np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(size, 2).repeat(size, 3)  # image i is all i
    y = np.arange(n) % 10
    return ResidentData(x, y, x[:8], y[:8], (0.0,), (1 / 255,), torch.device("cpu"), pad, flip, 10)


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


def test_augmentation_is_a_bounded_shift_and_flip():
    n, size, pad = 64, 8, 2
    g = np.random.default_rng(0)
    x = g.integers(1, 256, (n, 1, size, size)).astype(np.uint8)  # no zeros: padding is recognisable
    data = ResidentData(x, np.zeros(n), x[:4], np.zeros(4), (0.0,), (1 / 255,), torch.device("cpu"), pad, True, 10)
    xt = torch.as_tensor(x)
    shifts = torch.randint(-pad, pad + 1, (n, 2), generator=torch.Generator().manual_seed(0))
    flips = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.5
    out = data.augment(xt, shifts, flips)
    assert out.shape == xt.shape
    flipped_any = False
    for i in range(n):
        dy, dx = shifts[i].tolist()
        img = out[i, 0].flip(1) if flips[i] else out[i, 0]
        flipped_any |= bool(flips[i])
        # pixel (r, c) of the crop is pixel (r + dy, c + dx) of the original, or zero padding outside it
        for r in range(size):
            for c in range(size):
                sr, sc = r + dy, c + dx
                expect = xt[i, 0, sr, sc] if 0 <= sr < size and 0 <= sc < size else 0
                assert img[r, c] == expect
    assert flipped_any and shifts.abs().max() <= pad


def write_idx(path, array):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 | array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_data_dir(tmp_path):
    g = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 7)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", g.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", g.integers(0, 10, n))
    data = build_data("fashion-mnist", str(tmp_path), torch.device("cpu"))
    assert data.train_x.shape == (20, 1, 28, 28) and data.val_x.shape == (7, 1, 28, 28) and data.num_classes == 10
    with pytest.raises(DataError, match="--data-dir: no Fashion-MNIST IDX files"):
        build_data("fashion-mnist", str(tmp_path / ".."), torch.device("cpu"))


def test_cifar10_from_torchvision_layout(tmp_path, monkeypatch):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    g = np.random.default_rng(0)

    def batch(name, n):
        with open(root / name, "wb") as f:
            pickle.dump({"data": g.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(g.integers(0, 10, n))}, f)
    for i in range(1, 6):
        batch(f"data_batch_{i}", 4)
    batch("test_batch", 3)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # our tiny tree has no real checksums
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    data = build_data("cifar10", str(tmp_path), torch.device("cpu"))
    assert data.train_x.shape == (20, 3, 32, 32) and data.val_x.shape == (3, 3, 32, 32)
    x, y = next(data.train_loader(4, 0, 1, 0).epoch(0))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32


def test_imagenet_from_image_folder(tmp_path):
    from PIL import Image
    g = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(g.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.JPEG")
    data = build_data("imagenet", str(tmp_path), torch.device("cpu"), workers=0)
    assert data.num_classes == 2
    loader = data.train_loader(4, 0, 1, 0)
    assert loader.steps_per_epoch == 3
    x, y = next(loader.epoch(0))
    assert x.shape == (4, 3, 224, 224)
    val = list(data.val_batches(0, 2, 250)) + list(data.val_batches(1, 2, 250))
    assert sum(len(v[1]) for v in val) == 4  # sharded without repeats


def test_image_folder_resume_mid_epoch_skips_decoding(tmp_path):
    """A resumed epoch yields the rest of the same order and never loads the finished steps' images."""
    from PIL import Image
    for split in ("train", "val"):
        for i in range(12):
            (tmp_path / split / str(i % 3)).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / split / str(i % 3) / f"{i}.png")
    data = build_data("imagenet", str(tmp_path), torch.device("cpu"), workers=0)
    loaded = []

    class Counting(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            loaded.append(i)
            return self.inner[i]
    data.train_set = Counting(data.train_set)
    loader = data.train_loader(4, 0, 1, seed=5)
    full = [y.tolist() for _, y in loader.epoch(2)]
    order = list(loaded)
    loaded.clear()
    rest = [y.tolist() for _, y in loader.epoch(2, start_step=2)]
    assert len(full) == 3 and rest == full[2:]
    assert loaded == order[8:]  # only the last step's 4 images were read
    with pytest.raises(DataError, match="has no train/ folder"):
        build_data("imagenet", str(tmp_path / "train"), torch.device("cpu"))


def test_benchmark_runs_in_a_tiny_configuration(tmp_path):
    out = tmp_path / "bench.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--steps", "2", "--batch-size", "32", "--json",
                    str(out)], cwd=root, check=True, capture_output=True, timeout=600)
    figures = json.loads(out.read_text())
    for key in ("a_img_s", "b_img_s", "c_img_s", "b_over_a", "b_over_c"):
        assert figures[key] > 0
    assert figures["b_over_a"] == pytest.approx(figures["b_img_s"] / figures["a_img_s"])
