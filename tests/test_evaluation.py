"""Validation numbers checked against an independent computation: plain PyTorch on the run's own saved weights
and the plain normalised validation images (no method, no augmentation), on one process and on a world size
that leaves a remainder; schedule-free evaluated at its averaged weights."""
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


def test_validation_metrics_equal_plain_pytorch_with_methods_on(tmp_path):
    """Label smoothing and MixUp change training only: the logged validation loss is plain cross-entropy on
    plain images, top-1 counts the top 1 and top-5 the top 5."""
    run = str(tmp_path / "run")
    run_train(TINY + ["--run-dir", run, "--label-smoothing", "0.2", "--mixup", "0.4", "--amp", "none",
                      "--eval-every", "0"])
    expected = independent_metrics(run)
    assert expected["val_acc1"] < expected["val_acc5"] < 100  # top-1 and top-5 tell apart here
    assert_row_matches(last_row(run), expected)


def test_three_ranks_count_every_validation_image_once(tmp_path):
    """1024 validation images over 3 ranks leave a remainder: no image dropped, none counted twice."""
    assert len(make_synthetic()[3]) % 3 == 1
    run = str(tmp_path / "run")
    run_train(TINY + ["--run-dir", run, "--batch-size", "48", "--subset", "240", "--amp", "none", "--eval-every", "0"],
              torchrun=3)
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
    checkpoint written right after (y and the optimizer's z), x = y + (1 - 1/momentum) (z - y)."""
    import train
    monkeypatch.delenv("RANK", raising=False)
    seen = []
    real_evaluate = train.evaluate

    def spy(model, *args, **kwargs):
        seen.append([p.detach().clone() for p in model.parameters()])
        return real_evaluate(model, *args, **kwargs)
    monkeypatch.setattr(train, "evaluate", spy)
    run = str(tmp_path / "run")
    train.main(TINY + ["--run-dir", run, "--schedule", "schedule-free", "--amp", "none", "--eval-every", "0"])
    ckpt = torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)
    momentum = ckpt["optimizer"]["param_groups"][0]["momentum"]
    ys = [ckpt["model"][name] for name, _ in build_model("small_resnet", 10, 3).named_parameters()]
    zs = [ckpt["optimizer"]["state"][i]["z"] for i in range(len(ys))]
    for y, z, evaluated in zip(ys, zs, seen[-1]):
        torch.testing.assert_close(evaluated, y + (1 - 1 / momentum) * (z - y), rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(y, e) for y, e in zip(ys, seen[-1]))  # x and y are apart: the check can fail
