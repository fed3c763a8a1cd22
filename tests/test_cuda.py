"""The CUDA branches: side-stream prefetch, resident data on the GPU, fp16 with a GradScaler, NCCL, peak memory,
--compile. Skipped without a GPU; `./launch.sh gpu-check` runs them on one."""
import csv
import json

import pytest
import torch

from conftest import GPU_ENV, TINY, run_train

pytestmark = pytest.mark.cuda


def test_side_stream_prefetch_hands_out_the_loaders_batches():
    from data import on_device
    batches = [(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))) for _ in range(5)]
    got = list(on_device(iter(batches), torch.device("cuda")))
    assert len(got) == 5
    for (x, y), (gx, gy) in zip(batches, got):
        assert gx.is_cuda and torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)


def test_resident_batches_live_on_the_gpu_and_are_nchw():
    from data import build_data
    data = build_data("synthetic", None, torch.device("cuda"), subset=256)
    x, y = next(data.train_loader(32, 0, 1, 0).epoch(0))
    assert x.is_cuda and y.is_cuda and x.is_contiguous()


@pytest.mark.parametrize("amp,extra", [("fp16", []), ("bf16", []), ("bf16", ["--compile"])])
def test_a_short_cuda_run_under_torchrun(tmp_path, amp, extra):
    run = tmp_path / "run"
    run_train(TINY + ["--run-dir", str(run), "--amp", amp, "--channels-last"] + extra, torchrun=1, env=GPU_ENV)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert json.loads((run / "config.json").read_text())["device"] == "cuda"
    assert all(float(r["peak_mem_gb"]) > 0 for r in rows)
    # it learns as on the CPU (there, fp32 and bf16: train loss 2.33 -> 1.18-1.24, last val_acc1 30-38 %), not
    # merely above chance (10 %)
    assert float(rows[-1]["train_loss"]) < 0.75 * float(rows[0]["train_loss"]) and float(rows[-1]["val_acc1"]) > 20
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    if amp == "fp16":  # the GradScaler's state travels with the checkpoint
        assert ckpt["scaler"]["scale"] > 0


def test_a_cuda_run_in_fp32_follows_the_cpu_runs_curve(tmp_path):
    """The same tiny run (fp32, TF32 and autotuning off) on the GPU and on the CPU: every row's losses and accuracy
    agree to float rounding carried over 32 steps, not merely "the loss falls"."""
    rows = {}
    for where, env in (("cuda", GPU_ENV), ("cpu", {"CUDA_VISIBLE_DEVICES": ""})):
        run = tmp_path / where
        run_train(TINY + ["--run-dir", str(run), "--amp", "none", "--deterministic"], env=env)
        assert json.loads((run / "config.json").read_text())["device"] == where
        with open(run / "metrics.csv") as f:
            rows[where] = list(csv.DictReader(f))
    assert len(rows["cuda"]) == len(rows["cpu"]) >= 2
    for g, c in zip(rows["cuda"], rows["cpu"]):
        assert g["step"] == c["step"]
        for key in ("train_loss", "val_loss"):
            assert float(g[key]) == pytest.approx(float(c[key]), rel=1e-2), (g["step"], key)
        assert abs(float(g["val_acc1"]) - float(c["val_acc1"])) <= 2.0, g["step"]


@pytest.mark.parametrize("train", [True, False])
def test_gpu_decoding_gives_the_cpu_paths_images(tmp_path, train):
    """--decode cuda: nvJPEG decodes each batch on the GPU, which then crops, resizes and flips it as the workers
    would (the same boxes and flips per key); nvJPEG's pixels may differ from libjpeg's by a level or two."""
    from data import build_data
    from test_imagefolder import tree
    root = tree(tmp_path)
    cpu = build_data("imagenet", root, torch.device("cuda"), workers=2, image_size=32, augment=train)
    gpu = build_data("imagenet", root, torch.device("cuda"), workers=2, image_size=32, augment=train, decode="cuda")
    (xa, ya), (xb, yb) = next(cpu.train_loader(6, 0, 1, 3).steps([1])), next(gpu.train_loader(6, 0, 1, 3).steps([1]))
    assert xb.is_cuda and torch.equal(ya, yb)
    levels = ((xa - xb) * cpu.std).abs()
    assert levels.mean() < 2 and levels.max() < 40


def test_a_run_decoding_on_the_gpu(tmp_path):
    from test_imagefolder import FOLDER, tree
    run = tmp_path / "run"
    run_train(FOLDER + ["--data-dir", tree(tmp_path / "tree"), "--decode", "cuda", "--run-dir", str(run)],
              env=GPU_ENV)
    assert json.loads((run / "config.json").read_text())["decode"] == "cuda" and (run / "done").exists()
