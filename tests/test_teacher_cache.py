"""Teacher-output caching: replayable augmentation keys, the cache folder, and training that reads it."""

from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datamodules import ArrayDataset, CIFAR10DataModule, ImageNetDataModule, cifar_train_transform
from datamodules.replay import ReplayedAugmentation, augmentation_fingerprint, collate_keyed
from lightningkd.distillers import KD, FitNet
from lightningkd.modules import ClassificationDistillationModule
from lightningkd.teacher_cache import (
    TeacherCache,
    TeacherCacheMismatch,
    teacher_fingerprint,
    topk_to_logits,
    write_teacher_cache,
)
from tests.datamodules.test_classification import make_cifar10_pickles, make_image_folder
from tests.toys import toy_classifier


def cifar(root: Path, replays: int | None = 3, **kwargs) -> CIFAR10DataModule:
    return CIFAR10DataModule(root, batch_size=5, num_workers=0, replays=replays, **kwargs)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    make_cifar10_pickles(tmp_path / "data", per_batch=4)  # 20 training images
    return tmp_path / "data"


def module(teacher: nn.Module | None = None, cache: str | None = None, distillers=None, seed: int = 1):
    teacher = teacher if teacher is not None else toy_classifier(num_classes=10, seed=0)
    distillers = distillers if distillers is not None else [KD(temperature=4.0)]
    student = toy_classifier(num_classes=10, width=4, seed=seed)
    return ClassificationDistillationModule(student, teacher, distillers, num_classes=10, teacher_cache=cache)


def write(module_, datamodule, folder: Path, **kwargs) -> TeacherCache:
    write_teacher_cache(module_, datamodule, folder, log=lambda line: None, **kwargs)
    return TeacherCache(folder)


# ---- replayed augmentation --------------------------------------------------------------------------
def test_a_replay_is_the_same_input_with_the_same_key_every_time() -> None:
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    data = ReplayedAugmentation(ArrayDataset(images, np.arange(4), cifar_train_transform()), replays=6)
    first, again = data.replay(2, 4), data.replay(2, 4)
    data.replay(1, 0)  # drawing other views in between changes nothing
    assert torch.equal(first["image"], data.replay(2, 4)["image"]) and first["key"] == again["key"]
    views = [data.replay(2, k) for k in range(6)]
    # random crops and flips: several different views, and different views have different keys
    distinct_images = {v["image"].numpy().tobytes() for v in views}
    assert len(distinct_images) > 1
    assert len({v["key"] for v in views}) == len(distinct_images)
    # the same augmentation parameters on another image give another key (the index is part of it)
    assert data.replay(3, 4)["key"] != first["key"]
    # an access draws one of the fixed views
    torch.manual_seed(0)
    drawn = data[2]
    assert drawn["key"] in {v["key"] for v in views}
    assert drawn["target"] == 2


def test_the_key_follows_the_applied_crop_and_flip() -> None:
    # two pipelines that differ only in the flip probability: views without a flip match pixel for pixel
    # and have the same key; a flipped view has a different key
    images = np.random.default_rng(1).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    never = ReplayedAugmentation(ArrayDataset(images, np.zeros(1), A.Compose([A.HorizontalFlip(p=0.0)])), 1)
    always = ReplayedAugmentation(ArrayDataset(images, np.zeros(1), A.Compose([A.HorizontalFlip(p=1.0)])), 1)
    plain, flipped = never.replay(0, 0), always.replay(0, 0)
    assert np.array_equal(flipped["image"], plain["image"][:, ::-1])
    assert plain["key"] != flipped["key"]


def test_fingerprints_of_pipelines_and_data() -> None:
    assert augmentation_fingerprint(cifar_train_transform()) == augmentation_fingerprint(
        cifar_train_transform()
    )
    assert augmentation_fingerprint(cifar_train_transform()) != augmentation_fingerprint(
        cifar_train_transform(pad_mode="reflect")
    )
    with pytest.raises(TypeError, match="albumentations pipeline"):
        augmentation_fingerprint(lambda image: image)
    images = np.zeros((2, 4, 4, 3), np.uint8)
    changed = images.copy()
    changed[1, 0, 0, 0] = 1
    assert (
        ArrayDataset(images, np.arange(2)).fingerprint() != ArrayDataset(changed, np.arange(2)).fingerprint()
    )
    assert (
        ArrayDataset(images, np.arange(2)).fingerprint()
        != ArrayDataset(images, np.array([1, 0])).fingerprint()
    )


def test_datamodule_with_replays_gives_keyed_batches(data_root: Path) -> None:
    dm = cifar(data_root)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "target", "key"}
    assert batch["image"].shape == (5, 3, 32, 32) and batch["key"].dtype == torch.int64
    assert isinstance(next(iter(dm.val_dataloader())), (tuple, list))  # evaluation is unchanged
    with pytest.raises(ValueError, match="replays"):
        cifar(data_root, replays=None).cache_fingerprint()
    with pytest.raises(ValueError, match="replays must be >= 1"):
        cifar(data_root, replays=0)
    assert collate_keyed([None]) is None


# ---- the cache folder ------------------------------------------------------------------------------
def test_written_cache_holds_the_teachers_outputs_for_every_view(data_root: Path, tmp_path: Path) -> None:
    m, dm = module(), cifar(data_root)
    cache = write(m, dm, tmp_path / "cache", dtype="float32")
    assert len(cache) == 20 * 3 and cache.meta["replays"] == 3
    data = dm.train_set
    teacher = m.teacher.eval()
    for index, replay in [(0, 0), (7, 2), (19, 1)]:
        view = data.replay(index, replay)
        hit, rows = cache.lookup(torch.tensor([view["key"]]))
        assert hit.tolist() == [True]
        with torch.no_grad():
            expected = teacher(view["image"][None])
        torch.testing.assert_close(cache.read("output", rows), expected, rtol=1e-5, atol=1e-5)
    hit, rows = cache.lookup(torch.tensor([12345]))
    assert hit.tolist() == [False] and rows.size == 0
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["teacher"] == teacher_fingerprint(teacher) and meta["data"] == dm.cache_fingerprint()


def test_cache_never_writes_over_anything_and_refuses_an_incomplete_folder(
    data_root: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="never written over"):
        write_teacher_cache(module(), cifar(data_root), folder, log=lambda line: None)
    assert (folder / "notes.txt").read_text() == "keep"
    with pytest.raises(FileNotFoundError, match="interrupted"):
        TeacherCache(folder)
    with pytest.raises(FileNotFoundError, match="lightningkd cache"):
        TeacherCache(tmp_path / "absent")


def test_topk_logits_keep_the_top_probabilities_and_the_rest_mass() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    values, indices = logits.topk(2)
    full = topk_to_logits(values, indices, logits.logsumexp(1), 5)
    p, q = logits.softmax(1)[0], full.softmax(1)[0]
    # by hand: the two largest logits are classes 3 and 0
    assert q[3].item() == pytest.approx(p[3].item(), rel=1e-6) and q[0].item() == pytest.approx(
        p[0].item(), rel=1e-6
    )
    rest = (p[1] + p[2] + p[4]).item()
    assert q[1].item() == pytest.approx(rest / 3, rel=1e-5) == q[2].item() == q[4].item()


def test_topk_cache_rebuilds_full_logits(data_root: Path, tmp_path: Path) -> None:
    m, dm = module(), cifar(data_root)
    cache = write(m, dm, tmp_path / "cache", top_k=3, dtype="float32")
    view = dm.train_set.replay(5, 1)
    _, rows = cache.lookup(torch.tensor([view["key"]]))
    with torch.no_grad():
        p = m.teacher(view["image"][None]).softmax(1)[0]
    q = cache.read("output", rows).softmax(1)[0]
    top = p.topk(3).indices
    torch.testing.assert_close(q[top], p[top], rtol=1e-5, atol=1e-6)
    assert q.sum().item() == pytest.approx(1.0, abs=1e-5)


# ---- training with the cache --------------------------------------------------------------------------
def test_training_reads_the_cache_and_never_runs_the_teacher(data_root: Path, tmp_path: Path) -> None:
    dm = cifar(data_root)
    folder = tmp_path / "cache"
    write(module(), dm, folder, dtype="float32")
    cached, plain = module(cache=str(folder)), module()
    cached.teacher_cache = TeacherCache(folder)
    calls = []
    cached.teacher.register_forward_hook(lambda *args: calls.append(1))
    batch = next(iter(dm.train_dataloader()))
    cached.train()
    plain.train()
    loss_cached = cached.training_step(dict(batch), 0)
    loss_plain = plain.training_step(dict(batch), 0)
    assert calls == []
    assert loss_cached.item() == pytest.approx(loss_plain.item(), rel=1e-5)


def test_misses_run_the_teacher_on_those_samples_only(data_root: Path, tmp_path: Path) -> None:
    dm = cifar(data_root)
    folder = tmp_path / "cache"
    write(module(), dm, folder, dtype="float32")
    m = module(cache=str(folder))
    m.teacher_cache = TeacherCache(folder)
    seen = []
    m.teacher.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    batch = next(iter(dm.train_dataloader()))
    batch["key"] = batch["key"].clone()
    batch["key"][1] = 42  # not a key of the cache: a view it was not written for
    m.train()
    features = m.teacher_features(batch["image"], batch)
    assert seen == [1]
    with torch.no_grad():
        expected = m.teacher(batch["image"])
    torch.testing.assert_close(features["output"], expected, rtol=1e-5, atol=1e-5)


def test_fit_with_the_cache_and_with_the_cli(data_root: Path, tmp_path: Path) -> None:
    dm = cifar(data_root)
    folder = tmp_path / "cache"
    write(module(), dm, folder)
    m = module(cache=str(folder))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=1, enable_model_summary=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(m, datamodule=cifar(data_root))
    assert trainer.callback_metrics["train/teacher_cache_hit_rate"].item() == 1.0


@pytest.mark.parametrize(
    "change, reason",
    [
        ("teacher", "the teacher differs"),
        ("augmentation", "the augmentation pipeline differs"),
        ("seed", "the replay seed differs"),
        ("data", "the training images or labels differ"),
    ],
)
def test_a_cache_of_another_run_is_refused_with_what_differs(
    data_root: Path, tmp_path: Path, change: str, reason: str
) -> None:
    folder = tmp_path / "cache"
    write(module(), cifar(data_root), folder)
    teacher = toy_classifier(num_classes=10, seed=5) if change == "teacher" else None
    kwargs = {"augmentation": {"pad_mode": "reflect"}, "seed": {"seed": 3}}.get(change, {})
    root = data_root
    if change == "data":
        make_cifar10_pickles(tmp_path / "other", per_batch=4, seed=9)
        root = tmp_path / "other"
    m = module(teacher=teacher, cache=str(folder))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False)
    with pytest.raises(TeacherCacheMismatch, match=reason) as err:
        trainer.fit(m, datamodule=cifar(root, **kwargs))
    assert "lightningkd cache" in str(err.value)


def test_a_cache_without_the_distillers_layers_is_refused(data_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    write(module(), cifar(data_root), folder)
    fitnet = FitNet(student_layer="block", teacher_layer="block", student_channels=4, teacher_channels=8)
    m = module(cache=str(folder), distillers=[KD(), fitnet])
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"--layers block output"):
        trainer.fit(m, datamodule=cifar(data_root))


def test_cached_feature_layers_match_the_teacher(data_root: Path, tmp_path: Path) -> None:
    dm = cifar(data_root)
    cache = write(module(), dm, tmp_path / "cache", layers=["output", "block"], dtype="float32")
    assert cache.layers["block"]["shape"] == [8, 16, 16]
    view = dm.train_set.replay(3, 0)
    _, rows = cache.lookup(torch.tensor([view["key"]]))
    teacher = module().teacher.eval()
    with torch.no_grad():
        expected = teacher.block(teacher.stem(view["image"][None]))
    torch.testing.assert_close(cache.read("block", rows), expected, rtol=1e-5, atol=1e-5)


def test_distillers_that_need_the_teacher_at_every_step_refuse_a_cache() -> None:
    class ThroughTeacher(KD):
        needs_teacher_grad = True

    with pytest.raises(ValueError, match="back-propagates through the teacher"):
        module(cache="unused", distillers=[ThroughTeacher()])

    class RunsTeacherStages(KD):  # as ScaleKD's teacher parameter perception
        def attach_teacher(self, teacher: nn.Module) -> None:
            self.stages = [teacher]

    with pytest.raises(ValueError, match="runs the teacher's own layers"):
        module(cache="unused", distillers=[RunsTeacherStages()])
    with pytest.raises(ValueError, match="without a teacher"):
        ClassificationDistillationModule(
            toy_classifier(num_classes=10), None, [], num_classes=10, teacher_cache="x"
        )


def test_batches_without_keys_are_refused(data_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    write(module(), cifar(data_root), folder)
    m = module(cache=str(folder))
    m.teacher_cache = TeacherCache(folder)
    m.train()
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="carry no 'key'"):
        m.teacher_features(images, {"image": images, "target": torch.zeros(2, dtype=torch.long)})


def test_cached_kd_matches_kd_by_hand(data_root: Path, tmp_path: Path) -> None:
    # the KD term of a training step with the cache equals T^2 * KL(teacher || student) written out
    dm = cifar(data_root)
    folder = tmp_path / "cache"
    write(module(), dm, folder, dtype="float32")
    m = module(cache=str(folder))
    m.teacher_cache = TeacherCache(folder)
    m.train()
    batch = next(iter(dm.train_dataloader()))
    student = m.student_features(batch["image"], batch)
    teacher = m.teacher_features(batch["image"], batch)
    got = m.distillers[0](student, teacher, batch)
    with torch.no_grad():
        t = m.teacher(batch["image"]) / 4.0
    s = student["output"] / 4.0
    expected = 16.0 * (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_image_folders_replay_and_streams_refuse_replays(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "imagenet", {"train": 3, "val": 1}, ["a", "b"], size=(40, 48))
    with pytest.warns(UserWarning, match="1000 classes"):
        dm = ImageNetDataModule(tmp_path / "imagenet", image_size=32, batch_size=2, num_workers=0, replays=2)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "target", "key"} and batch["image"].shape == (2, 3, 32, 32)
    fingerprint = dm.cache_fingerprint()
    assert fingerprint["samples"] == 6 and len(fingerprint["data"]) == 32
    with pytest.raises(ValueError, match="cannot be read by index"):
        ImageNetDataModule(stream_dir=str(tmp_path / "stream"), replays=2)
