"""The ImageFolder path (data/folder.py): uint8 batches from the workers, one DataLoader per run and persistent
validation workers, the GPU-decode path's augmentation equal to the CPU path's, exact resume, and two gloo ranks
that split every epoch and draw their own crops."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import ROOT, run_train
from data import build_data
from data.folder import SeededSamples
from test_data import write_image_folder
from test_resume import kill_after, metrics_without_time

CPU = torch.device("cpu")


def photo(i, h=48, w=64):
    """A smooth RGB image with structure (so a crop shows where it was taken), distinct per i."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 4 + i * 7) % 256, (y * 5 + x) % 256, (x * y // 8 + 3 * i) % 256], -1).astype(np.uint8)


def tree(root, ext="JPEG", per_class=6):
    write_image_folder(root, {"train": per_class, "val": 2}, classes=("a", "b", "c"), pixels=photo)
    if ext != "png":
        from PIL import Image
        for path in root.rglob("*.png"):
            Image.open(path).save(path.with_suffix(f".{ext}"), format="JPEG", quality=90)
            path.unlink()
    return str(root)


def test_workers_ship_uint8_batches_of_the_crop_size(tmp_path):
    data = build_data("imagenet", tree(tmp_path), CPU, workers=2, image_size=40)
    loader = data.train_loader(6, 0, 1, seed=0)
    samples = SeededSamples(data.train_set, 40, train=True)
    x, y = next(iter(data.loader(samples, [loader.keys(0)])))  # what crosses shared memory
    assert x.dtype == torch.uint8 and x.shape == (6, 3, 40, 40) and x.numel() * x.element_size() == 6 * 3 * 40 * 40
    xf, yf = next(loader.epoch(0))  # on the device: float, normalised, NCHW
    assert xf.dtype == torch.float32 and torch.equal(yf, y)
    assert torch.allclose(xf, (x.float() - data.mean) / data.std)


class Pids(torch.utils.data.Dataset):
    """Records the process that loads each item (a file per pid, as workers cannot share a list)."""

    def __init__(self, inner, folder):
        self.inner, self.folder = inner, folder

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        open(os.path.join(self.folder, str(os.getpid())), "a").close()
        return self.inner[i]


def test_one_dataloader_serves_a_whole_run_and_validation_workers_persist(tmp_path):
    data = build_data("imagenet", tree(tmp_path / "tree"), CPU, workers=1, image_size=16)
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    data.train_set = Pids(data.train_set, str(tmp_path / "train"))
    loader = data.train_loader(6, 0, 1, seed=0)  # 3 steps per epoch
    run = list(loader.steps([0, 1, 2, 3, 4, 5, 6, 7, 8, 4, 5]))  # three epochs and a wsd-like jump back
    assert len(run) == 11 and len(os.listdir(tmp_path / "train")) == 1  # one worker process for all of it
    assert all(torch.equal(a[0], b[0]) for a, b in zip(run[4:6], run[9:11]))  # a path step's data is its own
    data.val_set = Pids(data.val_set, str(tmp_path / "val"))
    first = list(data.val_batches(0, 1, 4))
    second = list(data.val_batches(0, 1, 4))
    assert len(os.listdir(tmp_path / "val")) == 1 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second))


@pytest.mark.parametrize("ext", ["JPEG", "png"])
@pytest.mark.parametrize("train", [True, False])
def test_the_gpu_decode_path_augments_as_the_cpu_path(tmp_path, ext, train):
    """--decode cuda's worker side (bytes and a drawn box) and its device side, run here on the CPU device (the
    same libjpeg decoder), give exactly the CPU path's tensors: the same crops, flips and resizes per key."""
    root = tree(tmp_path, ext)
    cpu = build_data("imagenet", root, CPU, workers=0, image_size=24, augment=train)
    gpu = build_data("imagenet", root, CPU, workers=0, image_size=24, augment=train, decode="cuda")
    for step in range(3):
        a, b = cpu.train_loader(6, 0, 1, 5), gpu.train_loader(6, 0, 1, 5)
        (xa, ya), (xb, yb) = next(a.steps([step])), next(b.steps([step]))
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    va, vb = list(cpu.val_batches(0, 1, 4)), list(gpu.val_batches(0, 1, 4))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(va, vb))


def test_default_workers_share_the_cpus_among_the_nodes_ranks(monkeypatch):
    import options
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert options.default_workers() == 7
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert options.default_workers() == 63
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert options.default_workers() == 1


FOLDER = ["--data", "imagenet", "--image-size", "24", "--batch-size", "6", "--workers", "1", "--warmup-epochs", "1",
          "--t0", "1", "--cycles", "2", "--lr", "0.05", "--amp", "none", "--no-progress", "--eval-every", "0.34",
          "--checkpoint-every", "0"]


def test_a_killed_image_folder_run_resumes_to_the_same_metrics(tmp_path):
    root = tree(tmp_path / "tree", per_class=8)  # 24 images, batch 6: 4 steps an epoch, 12 steps
    args = FOLDER + ["--data-dir", root, "--mixup"]
    run_train(args + ["--run-dir", str(tmp_path / "ref")])
    run = str(tmp_path / "run")
    kill_after(args + ["--run-dir", run], 3, 0.1)  # mid-epoch: rows every third of an epoch
    assert not os.path.exists(os.path.join(run, "done"))
    run_train(args + ["--run-dir", run, "--resume", "auto"])
    assert metrics_without_time(run) == metrics_without_time(str(tmp_path / "ref"))


RECORDER = '''import json, os, torch
from methods import Method

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]) * 255, torch.tensor([0.229, 0.224, 0.225]) * 255


class Recorder(Method):
    """Writes, per training image, (path step, its place in the batch, channel 0: the image's id, a hash of its
    crop of channels 1-2) to $RECORD.<rank>."""
    name = "recorder"

    def transform_batch(self, x, y, ctx):
        raw = (x * STD.view(1, 3, 1, 1) + MEAN.view(1, 3, 1, 1)).round().long()
        with open(os.environ["RECORD"] + f".{ctx.rank}", "a") as f:
            for i in range(len(x)):
                f.write(json.dumps([ctx.step, i, int(raw[i, 0, 0, 0]), int(raw[i, 0].max()),
                                    hash(tuple(raw[i, 1:].flatten().tolist()))]) + "\\n")
        return x, y
'''


def test_two_gloo_ranks_see_every_image_once_an_epoch_with_their_own_crops(tmp_path):
    from PIL import Image
    g = np.random.default_rng(0)
    texture = g.integers(0, 256, (40, 40, 2), np.uint8)  # the same in every image: a crop's hash is its draw
    for split, n in (("train", 12), ("val", 2)):
        for c in ("a", "b"):
            (tmp_path / "tree" / split / c).mkdir(parents=True)
            for i in range(n):
                ident = 10 * i + (5 if c == "b" else 0) + (130 if split == "val" else 0)  # channel 0: the image's id
                pixels = np.concatenate([np.full((40, 40, 1), ident, np.uint8), texture], -1)
                Image.fromarray(pixels).save(tmp_path / "tree" / split / c / f"{i}.png")
    (tmp_path / "recorder.py").write_text(RECORDER)
    record = str(tmp_path / "seen")
    run_train(FOLDER + ["--data-dir", str(tmp_path / "tree"), "--batch-size", "8", "--plugins",
                        str(tmp_path / "recorder.py"), "--method", "recorder", "--run-dir", str(tmp_path / "run")],
              torchrun=2, env={"RECORD": record})
    seen = {}
    for rank in (0, 1):
        for line in open(f"{record}.{rank}"):
            step, place, ident, top, draw = json.loads(line)
            assert ident == top  # channel 0 is constant: crops keep it whole
            seen[(rank, step, place)] = (ident, draw)  # the start-up pass repeats step 0: same entries
    steps = 24 // 8  # per epoch
    for epoch in range(3):
        per_rank = {r: [v[0] for (rr, s, _), v in seen.items() if rr == r and s // steps == epoch] for r in (0, 1)}
        assert len(per_rank[0]) == len(per_rank[1]) == 12
        assert sorted(per_rank[0] + per_rank[1]) == sorted(10 * i + k for i in range(12) for k in (0, 5))
    draws = {r: [v[1] for (rr, _, _), v in seen.items() if rr == r] for r in (0, 1)}
    assert len(set(draws[0]) | set(draws[1])) > 0.9 * (len(draws[0]) + len(draws[1]))  # crops differ, across ranks too


def test_a_sigterm_to_every_process_of_a_folder_run_stops_it_at_a_checkpoint(tmp_path):
    """SLURM signals every process of a job (and torchrun a worker's whole process group): the DataLoader workers
    leave the signal to train.py, which stops at its next step after a checkpoint (a worker killed by it failed the
    next batch: no checkpoint, exit 2), and the run resumes to its end."""
    import signal
    import subprocess
    from conftest import ENV, train_cmd
    from test_resume import wait_for_rows
    root = tree(tmp_path / "tree", per_class=8)  # 24 images, batch 2: 12 steps an epoch, 48 steps, rows every 12
    run = str(tmp_path / "run")
    args = FOLDER + ["--data-dir", root, "--batch-size", "2", "--eval-every", "1", "--run-dir", run]
    p = subprocess.Popen(train_cmd(args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    wait_for_rows(p, args, 1, 0.0)
    os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143 and "train.py: SIGTERM: checkpoint at step" in err, err[-2000:]
    run_train(args + ["--resume", "auto"])
    assert len(metrics_without_time(run)) == 4 and os.path.exists(os.path.join(run, "done"))
