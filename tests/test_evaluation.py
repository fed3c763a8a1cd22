"""Validation numbers checked against an independent computation: plain PyTorch on the run's own saved weights
and the plain normalised validation images (no method, no augmentation), on one process and on a world size
that leaves a remainder; schedule-free evaluated at its averaged weights."""
import copy
import csv
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, run_train
from data import STATS, ResidentData, build_data, make_synthetic
from models import build_model
from test_data import write_image_folder

CPU = torch.device("cpu")


def last_row(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))[-1]


@torch.no_grad()
def independent_metrics(run):
    """Loss, top-1 and top-5 of the run's last checkpoint on the synthetic validation set, written from scratch:
    images normalised by hand, the model in eval mode, all at once in fp32."""
    model = build_model("small_resnet", 10, 3)
    model.load_state_dict(torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)["model"])
    model.eval()
    _, _, xva, yva = make_synthetic()
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in STATS["synthetic"])
    x = (torch.from_numpy(xva).float() / 255 - mean) / std
    y = torch.from_numpy(yva).long()
    logits = model(x)
    ranks = (logits > logits.gather(1, y[:, None])).sum(1)  # how many classes score above the true one
    return dict(val_loss=F.cross_entropy(logits, y).item(), val_acc1=100 * (ranks < 1).float().mean().item(),
                val_acc5=100 * (ranks < 5).float().mean().item())


def assert_row_matches(row, expected):
    assert float(row["val_loss"]) == pytest.approx(expected["val_loss"], abs=2e-6)
    assert float(row["val_acc1"]) == pytest.approx(expected["val_acc1"], abs=1e-4)
    assert float(row["val_acc5"]) == pytest.approx(expected["val_acc5"], abs=1e-4)


@pytest.mark.parametrize("methods", [["--label-smoothing", "0.2", "--mixup", "0.4"], ["--method", "cutmix"],
                                     ["--method", "progressive_resizing", "--method", "stochastic_depth:rate=0.5"]])
def test_validation_metrics_equal_plain_pytorch_with_methods_on(tmp_path, methods):
    """Label smoothing, MixUp, CutMix, progressive resizing and stochastic depth change training only: the logged
    validation loss is plain cross-entropy on plain full-size images through the whole network, top-1 counts the
    top 1 and top-5 the top 5."""
    run = str(tmp_path / "run")
    run_train(TINY + ["--run-dir", run, "--amp", "none", "--eval-every", "0"] + methods)
    expected = independent_metrics(run)
    assert expected["val_acc1"] < expected["val_acc5"] < 100  # top-1 and top-5 tell apart here
    assert_row_matches(last_row(run), expected)


def test_three_ranks_count_every_validation_image_once(tmp_path):
    """1024 validation images over 3 ranks leave a remainder: no image dropped, none counted twice."""
    assert len(make_synthetic()[3]) % 3 == 1
    run = str(tmp_path / "run")
    run_train(TINY + ["--run-dir", run, "--batch-size", "48", "--subset", "240", "--amp", "none", "--eval-every", "0",
                      "--label-smoothing", "0.2", "--mixup", "0.4"], torchrun=3)  # methods stay off validation here too
    assert_row_matches(last_row(run), independent_metrics(run))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_resident_validation_shards_hold_every_image_once(world):
    x, y = np.arange(7 * 3 * 2 * 2, dtype=np.uint8).reshape(7, 3, 2, 2), np.arange(7) % 3
    data = ResidentData(x, y, x, y, (0.0,) * 3, (1 / 255,) * 3, CPU, 2, True, 3)
    seen = [img[0, 0, 0].item() for r in range(world) for xb, _ in data.val_batches(r, world, 2) for img in xb]
    assert sorted(seen) == sorted(x[:, 0, 0, 0].tolist())  # plain images (no crop, no flip), each exactly once


@pytest.mark.parametrize("world", [2, 3])
def test_image_folder_validation_shards_hold_every_image_once(tmp_path, world):
    write_image_folder(tmp_path, {"train": 2, "val": 5}, pixels=lambda i: np.full((8, 8, 3), 10 * i, np.uint8))
    data = build_data("imagenet", str(tmp_path), CPU, workers=0)
    labels = [int(v) for r in range(world) for _, yb in data.val_batches(r, world, 2) for v in yb]
    pixels = sorted(round(float(xb[i, 0, 0, 0]), 3) for r in range(world) for xb, _ in data.val_batches(r, world, 2)
                    for i in range(len(xb)))
    whole = sorted(round(float(xb[i, 0, 0, 0]), 3) for xb, _ in data.val_batches(0, 1, 100) for i in range(len(xb)))
    assert sorted(labels) == [0] * 5 + [1] * 5 and pixels == whole and len(set(whole)) == 10


def test_schedule_free_evaluates_its_averaged_weights(tmp_path, monkeypatch):
    """At every evaluation the model holds schedule-free's x (the average), not the y it trains at: from the
    checkpoint written right after it (y and the optimizer's z), x = y + (1 - 1/momentum) (z - y)."""
    import train
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    evaluated, saved = [], []
    real_evaluate, real_save = train.evaluate, train.save_checkpoint

    def spy_evaluate(model, *args, **kwargs):
        evaluated.append([p.detach().clone() for p in model.parameters()])
        return real_evaluate(model, *args, **kwargs)

    def spy_save(run_dir, state):
        saved.append(copy.deepcopy(state))
        return real_save(run_dir, state)
    monkeypatch.setattr(train, "evaluate", spy_evaluate)
    monkeypatch.setattr(train, "save_checkpoint", spy_save)
    run = str(tmp_path / "run")
    train.main(TINY + ["--run-dir", run, "--schedule", "schedule-free", "--amp", "none", "--eval-every", "0.5",
                       "--checkpoint-every", "0"])
    assert len(evaluated) == len(saved) == 8  # every half epoch: a checkpoint right after each evaluation
    names = [name for name, _ in build_model("small_resnet", 10, 3).named_parameters()]
    for x, ckpt in zip(evaluated, saved):
        momentum = ckpt["optimizer"]["param_groups"][0]["momentum"]
        ys = [ckpt["model"][name] for name in names]
        zs = [ckpt["optimizer"]["state"][i]["z"] for i in range(len(ys))]
        for y, z, e in zip(ys, zs, x):
            torch.testing.assert_close(e, y + (1 - 1 / momentum) * (z - y), rtol=1e-5, atol=1e-6)
        assert any(not torch.allclose(y, e) for y, e in zip(ys, x))  # x and y are apart: the check can fail


def test_image_folder_validation_images_are_resized_and_centre_cropped_only(tmp_path):
    """Asymmetric images (a random crop, a flip or a resize to another size would change them), against the
    standard evaluation transform written out with PIL and plain tensor arithmetic (the pipeline resizes uint8
    tensors: within one level of PIL's rounding); twice the same."""
    from PIL import Image
    g = np.random.default_rng(0)
    write_image_folder(tmp_path, {"train": 2, "val": 3}, pixels=lambda i: g.integers(0, 256, (300, 260, 3), np.uint8))
    data = build_data("imagenet", str(tmp_path), CPU, workers=0)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in STATS["imagenet"])
    expected = []
    for path, _ in data.val_set.samples:
        img = Image.open(path).convert("RGB")
        w, h = img.size
        short, long = sorted((w, h))  # shorter side to 256 (the longer truncated), then the central 224 x 224
        size = (256, int(256 * long / short)) if w == short else (int(256 * long / short), 256)
        img = img.resize(size, Image.BILINEAR)
        left, top = (int(round((s - 224) / 2)) for s in img.size)
        img = img.crop((left, top, left + 224, top + 224))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
        expected.append((x - mean) / std)
    for _ in range(2):
        got = [xb[i] for xb, _ in data.val_batches(0, 1, 4) for i in range(len(xb))]
        assert len(got) == len(expected) == 6
        for e, x in zip(expected, got):  # in 0-255 levels: torch's uint8 resize rounds within 2 levels of PIL's
            levels = ((x - e) * std * 255).abs()
            assert levels.max() <= 2.01 and levels.mean() < 0.1, (levels.max(), levels.mean())
