"""Sharded storage (`python shards.py`: data/prepare.py writes, data/shards.py reads): a prepared tree serves the
folder path's very batches where no image changed, resizes and re-encodes what it must, refuses to write over
anything, and names a damaged image."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, run_train
from data import DataError, build_data, prepare, shards
from test_imagefolder import FOLDER, tree
from test_resume import metrics_without_time

CPU = torch.device("cpu")


def batches(data, steps=3):
    loader = data.train_loader(6, 0, 1, seed=3)
    return list(loader.steps(range(steps))) + list(data.val_batches(0, 1, 4))


@pytest.mark.parametrize("decode", ["cpu", "cuda"], ids=["cpu", "gpu-path-on-cpu"])  # the GPU path's worker side
def test_shards_of_small_jpegs_give_the_folder_trees_batches(tmp_path, decode):
    root = tree(tmp_path / "tree")
    counts = prepare.prepare(root, str(tmp_path / "out"), short_side=256, shard_mb=1, workers=1, progress=False)
    assert counts == {"train": {"as-is": 18}, "val": {"as-is": 6}}
    folder = build_data("imagenet", root, CPU, workers=0, image_size=24, decode=decode)
    sharded = build_data("imagenet", str(tmp_path / "out"), CPU, workers=2, image_size=24, decode=decode)
    assert sharded.storage["short_side"] == 256 and folder.storage == "folder"
    assert sharded.train_set.classes == folder.train_set.classes
    for (xa, ya), (xb, yb) in zip(batches(folder), batches(sharded), strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_large_images_are_resized_and_other_formats_reencoded(tmp_path):
    root = tree(tmp_path / "tree", ext="png")  # 48 x 64 PNGs
    out = str(tmp_path / "out")
    counts = prepare.prepare(root, out, short_side=32, quality=95, shard_mb=1, workers=2, progress=False)
    assert counts == {"train": {"resized": 18}, "val": {"resized": 6}}
    data = build_data("imagenet", out, CPU, workers=0, augment=False, image_size=16)
    ref = build_data("imagenet", root, CPU, workers=0, augment=False, image_size=16)
    assert data.train_set.index[:, 4:].tolist() == [[32, 42]] * 18  # torchvision's shorter-side resize
    from torchvision.transforms.v2.functional import resize
    raw = shards.ShardSet(os.path.join(out, "train"), None)
    want = [resize(ref.train_set.loader(path), 32, antialias=True).float() for path, _ in ref.train_set.samples]
    for i in (0, 7, 17):
        stored, _ = data.train_set[i]  # augment=False: resized to 18, centre 16
        errors = torch.stack([(raw[i][0].float() - w).abs().mean() for w in want])
        assert raw[i][0].shape == (3, 32, 42) and errors.argmin() == i and errors[i] < 6  # its own, JPEG's error
        assert stored.shape == (3, 16, 16) and data.train_set.targets[i] == ref.train_set.targets[i]
    gpu = build_data("imagenet", out, CPU, workers=0, image_size=16, decode="cuda")  # its worker side, on the CPU
    cpu = build_data("imagenet", out, CPU, workers=0, image_size=16)
    for (xa, ya), (xb, yb) in zip(batches(cpu), batches(gpu), strict=True):  # the stored images, not the tree's
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    prepare.prepare(root, str(tmp_path / "as-is"), short_side=48, workers=1, progress=False)
    meta = json.load(open(tmp_path / "as-is" / "train" / "meta.json"))
    assert meta["stored"] == {"re-encoded": 18} and meta["images"] == 18  # PNGs that fit: JPEG now


def test_prepare_refuses_to_write_over_anything_and_finishes_an_interrupted_one(tmp_path):
    root = tree(tmp_path / "tree")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not empty"):
        prepare.prepare(root, str(out), workers=1, progress=False)
    assert os.listdir(out) == ["notes.txt"]
    (out / "notes.txt").unlink()
    (out / shards.MARK).touch()  # an interrupted prepare: refused by the loader, finished by a new prepare
    (out / "train").mkdir()
    (out / "train" / "shard-00007.bin").write_bytes(b"half")
    with pytest.raises(DataError, match="unfinished"):
        build_data("imagenet", str(out), CPU, workers=0)
    prepare.prepare(root, str(out), workers=1, progress=False)
    assert sorted(os.listdir(out / "train")) == ["index.npy", "meta.json", "paths.txt", "shard-00000.bin"]
    assert not (out / shards.MARK).exists() and len(build_data("imagenet", str(out), CPU, workers=0).train_set) == 18
    (out / shards.MARK).touch()  # interrupted while writing val/: train/ is kept, val/ written again
    (out / "val" / "meta.json").unlink()
    train_shard = (out / "train" / "shard-00000.bin").stat()
    assert prepare.prepare(root, str(out), workers=1, progress=False) == {"train": {"as-is": 18}, "val": {"as-is": 6}}
    assert (out / "train" / "shard-00000.bin").stat().st_mtime_ns == train_shard.st_mtime_ns
    assert (out / "val" / "meta.json").exists() and not (out / shards.MARK).exists()


def test_a_damaged_image_is_named_by_prepare_and_by_the_loader(tmp_path):
    root = tree(tmp_path / "tree")
    bad = sorted((tmp_path / "tree" / "train" / "b").iterdir())[1]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "shards.py"), root, str(tmp_path / "big"),
                        "--short-side", "20"], capture_output=True, text=True, cwd=str(tmp_path))  # the command
    assert p.returncode == 0 and "train: 18 images (18 resized)" in p.stdout
    good = bad.read_bytes()
    bad.write_bytes(good[:len(good) // 2])  # truncated, its header whole: found although it would be stored as is
    with pytest.raises(DataError, match=f"SRC: error while reading {bad}.*prepare again"):
        prepare.prepare(root, str(tmp_path / "out"), short_side=4096, workers=1, progress=False)
    bad.write_bytes(good)
    prepare.prepare(root, str(tmp_path / "out"), short_side=4096, workers=1, progress=False)  # over the interrupted
    data = build_data("imagenet", str(tmp_path / "out"), CPU, workers=0, image_size=16)
    i = [path for path, _ in data.train_set.samples].index(str(bad))
    shard, offset = data.train_set.index[i, :2]
    with open(tmp_path / "out" / "train" / f"shard-{shard:05d}.bin", "r+b") as f:  # its bytes spoilt in the shard
        f.seek(offset)
        f.write(bytes(64))
    with pytest.raises(DataError) as e:  # the shard's bytes and its index row are named, not the intact source
        list(data.train_loader(6, 0, 1, seed=0).epoch(0))
    assert str(e.value).startswith(f"--data-dir: error while reading image {i} of {tmp_path / 'out' / 'train'} as "
                                   f"stored (shard-{shard:05d}.bin, bytes {offset}-") and f"index.npy row {i})" in str(
        e.value) and str(bad) not in str(e.value) and "good copy" not in str(e.value)
    assert str(e.value).endswith("; run shards.py SRC OUT again (remove OUT first), then continue with --resume")


def test_a_shard_cut_short_or_missing_and_mixed_storage_are_refused(tmp_path):
    root = tree(tmp_path / "tree")
    out = tmp_path / "out"
    prepare.prepare(root, str(out), shard_mb=1, workers=1, progress=False)
    shard = out / "train" / "shard-00000.bin"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-10])  # a copy cut short
    with pytest.raises(DataError, match=f"{shard} is {len(whole) - 10} bytes, its index needs {len(whole)}"):
        build_data("imagenet", str(out), CPU, workers=0)
    shard.unlink()
    with pytest.raises(DataError, match="shard-00000.bin is missing"):
        build_data("imagenet", str(out), CPU, workers=0)
    shard.write_bytes(whole)
    meta = json.loads((out / "train" / "meta.json").read_text())
    (out / "train" / "meta.json").write_text(json.dumps(dict(meta, images=17)))  # a meta of another prepare
    with pytest.raises(DataError, match="index.npy does not fit its meta.json"):
        build_data("imagenet", str(out), CPU, workers=0)
    (out / "train" / "meta.json").write_text(json.dumps(meta))
    import shutil
    shutil.rmtree(out / "val")
    shutil.copytree(tmp_path / "tree" / "val", out / "val")  # val/ a tree, train/ shards
    with pytest.raises(DataError, match="train/ and val/ are stored differently"):
        build_data("imagenet", str(out), CPU, workers=0)
    with pytest.raises(DataError, match="SRC: .* is itself shards.py's output"):
        prepare.prepare(str(out), str(tmp_path / "again"), workers=1, progress=False)


def test_grayscale_jpegs_are_stored_as_they_are_and_cmyk_reencoded(tmp_path):
    from PIL import Image
    root = tree(tmp_path / "tree")
    a = sorted((tmp_path / "tree" / "train" / "a").iterdir())
    Image.open(a[0]).convert("L").save(a[0], format="JPEG", quality=90)
    Image.open(a[1]).convert("CMYK").save(a[1], format="JPEG", quality=90)
    counts = prepare.prepare(root, str(tmp_path / "out"), workers=1, progress=False)
    assert counts["train"] == {"as-is": 17, "re-encoded": 1}
    folder = build_data("imagenet", root, CPU, workers=0, augment=False, image_size=24)
    sharded = build_data("imagenet", str(tmp_path / "out"), CPU, workers=0, augment=False, image_size=24)
    assert torch.equal(folder.train_set[0][0], sharded.train_set[0][0])  # grey, as RGB, to the bit
    cmyk = (folder.train_set[1][0].float() - sharded.train_set[1][0].float()).abs().mean()
    assert sharded.train_set[1][0].shape == (3, 24, 24) and cmyk < 6


def test_prepare_refuses_an_out_being_written_and_runs_warn_of_upsampled_shards(tmp_path, capsys):
    import fcntl
    root = tree(tmp_path / "tree")
    out = tmp_path / "out"
    out.mkdir()
    held = os.open(out, os.O_RDONLY)  # another shards.py writing it now
    fcntl.flock(held, fcntl.LOCK_EX)
    with pytest.raises(DataError, match="being written by another shards.py"):
        prepare.prepare(root, str(out), workers=1, progress=False)
    os.close(held)
    prepare.prepare(root, str(out), short_side=20, workers=1, progress=False)
    build_data("imagenet", str(out), CPU, workers=0, image_size=24)  # evaluates at 27 > 20
    assert "shorter side of 20, below the 27 that --image-size 24 evaluates at" in capsys.readouterr().err


def test_a_run_on_shards_of_unchanged_images_equals_the_folder_run(tmp_path):
    root = tree(tmp_path / "tree", per_class=8)
    prepare.prepare(root, str(tmp_path / "out"), workers=1, progress=False)
    for name, where in (("folder", root), ("shards", str(tmp_path / "out"))):  # one in a new interpreter
        run_train(FOLDER + ["--data-dir", where, "--run-dir", str(tmp_path / name)], fresh=name == "folder")
    assert metrics_without_time(str(tmp_path / "shards")) == metrics_without_time(str(tmp_path / "folder"))
    config = json.load(open(tmp_path / "shards" / "config.json"))
    assert config["data_storage"]["stored"] == {"as-is": 24} and np.load(
        tmp_path / "out" / "train" / "index.npy").shape == (24, len(shards.COLUMNS))
    os.remove(tmp_path / "shards" / "done")  # as if killed after its last checkpoint
    import shutil
    shutil.rmtree(tmp_path / "out")  # and the shards prepared again, smaller
    prepare.prepare(root, str(tmp_path / "out"), short_side=20, workers=1, progress=False)
    p = run_train(FOLDER + ["--data-dir", str(tmp_path / "out"), "--run-dir", str(tmp_path / "shards"), "--resume",
                            "auto"], check=False)
    assert p.returncode != 0 and "are not stored as when" in p.stderr.strip().splitlines()[-1]


def edited_index(out, edit, split="train"):
    """OUT/split/index.npy with edit(table) applied in place, as a hand edit or a stray script would leave it."""
    path = out / split / "index.npy"
    table = np.load(path)
    edit(table)
    np.save(path, table)


@pytest.mark.parametrize("edit", ["label", "swap"])
def test_an_index_changed_after_preparing_is_refused_before_anything_is_written(tmp_path, edit):
    """A fresh run checked nothing against meta.json (a resume compares index_crc32 only with the run's start):
    a label 0 -> 1, or two rows swapped, trained on wrong labels without a word."""
    root = tree(tmp_path / "tree", per_class=8)
    out = tmp_path / "out"
    prepare.prepare(root, str(out), workers=1, progress=False)
    if edit == "label":
        edited_index(out, lambda t: t.__setitem__((0, 3), 1))  # image 0 is of class 0
    else:
        edited_index(out, lambda t: t.__setitem__([0, 23], t[[23, 0]]))  # the first and the last: other classes
    run = tmp_path / "run"
    p = run_train(FOLDER + ["--data-dir", str(out), "--run-dir", str(run)], check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"train.py: error: --data-dir: {out / 'train'}/index.npy was changed after shards.py wrote it (CRC-32 "
        f"{shards.table_crc32(np.load(out / 'train' / 'index.npy'))}, meta.json records "
        f"{json.loads((out / 'train' / 'meta.json').read_text())['index_crc32']}): its labels or order may be wrong; "
        f"remove it and run shards.py again"]
    assert not run.exists()


def test_an_index_saved_as_floats_is_refused_in_one_line(tmp_path):
    """A script that saved index.npy again as floats (same values) met an IndexError traceback."""
    root = tree(tmp_path / "tree")
    out = tmp_path / "out"
    prepare.prepare(root, str(out), workers=1, progress=False)
    index = out / "train" / "index.npy"
    np.save(index, np.load(index).astype(np.float64))
    run = tmp_path / "run"
    p = run_train(FOLDER + ["--data-dir", str(out), "--run-dir", str(run)], check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "index.npy is a float64 table" in p.stderr and not run.exists()


def test_a_label_outside_the_classes_is_refused_before_anything_is_written(tmp_path):
    """Was IndexError ('Target 5 is out of bounds') mid-training, the run folder left; also for shards prepared
    before meta.json recorded index_crc32."""
    root = tree(tmp_path / "tree")
    out = tmp_path / "out"
    prepare.prepare(root, str(out), workers=1, progress=False)
    edited_index(out, lambda t: t.__setitem__((4, 3), 5), split="val")
    meta = json.loads((out / "val" / "meta.json").read_text())
    del meta["index_crc32"]  # as an older shards.py wrote it
    (out / "val" / "meta.json").write_text(json.dumps(meta))
    run = tmp_path / "run"
    p = run_train(FOLDER + ["--data-dir", str(out), "--run-dir", str(run)], check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"train.py: error: --data-dir: {out / 'val'}/index.npy row 4 has label 5, outside its meta.json's 3 classes "
        f"(0-2); remove it and run shards.py again"]
    assert not run.exists()
