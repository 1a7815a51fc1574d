"""The classify task's own pieces: its training augmentation (per image for photos, per batch for small
images) and its options."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from cnnkit.engine.config import TrainConfig
from cnnkit.tasks.classify import ClassifyTask, FitTo, SmallImageAugment, train_transform

BLACK = [-1.0]  # the fill these tests give: any value that no test image contains


def _batch(n=64, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g) + 1.0  # values in [1, 2): never the fill


def test_small_images_get_only_fitted_per_image_and_photos_their_crop_and_flip():
    assert isinstance(train_transform(32, 28, True), FitTo)
    assert isinstance(train_transform(32, 28, False), FitTo)
    photos = train_transform(32, 256, True)
    assert [type(t) for t in photos.transforms] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]


def test_each_image_is_a_padded_crop_of_itself_flipped_or_not():
    torch.manual_seed(1)
    x = _batch()
    out = SmallImageAugment(32, erasing=0.0)(x, BLACK)
    padded = F.pad(x, (4, 4, 4, 4), value=BLACK[0])
    tops, flips = set(), []
    for k in range(x.shape[0]):
        found = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
                 if torch.equal(out[k], (lambda c: c.flip(-1) if f else c)(padded[k, :, t:t + 32, l:l + 32]))]
        assert len(found) == 1, f"image {k}: not one crop of its padded self ({found})"
        tops.add(found[0][0])
        flips.append(found[0][2])
    assert len(tops) >= 6  # offsets 0..8 are drawn, not a fixed one
    assert 16 <= sum(flips) <= 48  # p = 0.5 over 64 images


def _erased_fraction(images, fill):
    return (images == fill).float().mean(dim=(1, 2, 3))


def test_erasing_draws_rectangles_as_torchvision_random_erasing_does():
    torch.manual_seed(2)
    n = 2000
    ones = torch.ones(n, 1, 32, 32)
    aug = SmallImageAugment(32, erasing=1.0)
    mask = aug.erase_mask(n, 32, 32)
    ours = mask.float().mean(dim=(1, 2, 3))
    for k in range(20):  # each erased region is one axis-aligned rectangle
        rows, cols = mask[k, 0].any(1).nonzero().flatten(), mask[k, 0].any(0).nonzero().flatten()
        assert mask[k, 0].sum() == len(rows) * len(cols)
        assert mask[k, 0, rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    reference = v2.RandomErasing(p=1.0, scale=(0.02, 0.25), value=0)
    theirs = _erased_fraction(torch.stack([reference(ones[0]) for _ in range(n)]), 0.0)
    assert (ours > 0).float().mean() > 0.97 and (theirs > 0).float().mean() > 0.97
    assert ours.max() <= 0.27 and ours[ours > 0].min() >= 0.015
    assert abs(float(ours.mean()) - float(theirs.mean())) < 0.01  # both about 0.13: U(0.02, 0.25) of the area
    half = SmallImageAugment(32, erasing=0.5).erase_mask(n, 32, 32).flatten(1).any(1).float().mean()
    assert 0.45 < float(half) < 0.55


def test_the_augmentation_keeps_channels_last_and_runs_only_in_training():
    task = ClassifyTask()
    task.mean, task.std = (0.5,), (0.25,)
    task.batch_augment = SmallImageAugment(32, erasing=0.5)
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return x.flatten(1)[:, :10]

    x = _batch(8).contiguous(memory_format=torch.channels_last)
    model = Probe()
    task.loss(model.eval(), x, torch.zeros(8, dtype=torch.long))
    assert torch.equal(seen[-1], x)
    torch.manual_seed(3)
    task.loss(model.train(), x, torch.zeros(8, dtype=torch.long))
    assert not torch.equal(seen[-1], x) and seen[-1].is_contiguous(memory_format=torch.channels_last)
    assert ((seen[-1] == -2.0) | (seen[-1] >= 1.0)).all()  # black (0 normalised: -0.5 / 0.25) or the image


def test_erasing_probability_reaches_the_batch_augmentation():
    for p in (0.5, 0.0):
        cfg = TrainConfig.for_task("classify", erasing=p, data="fashion-mnist")
        task = ClassifyTask()
        task.build_data(cfg)
        assert task.batch_augment is not None and task.batch_augment.erasing == p
    task = ClassifyTask()
    task.build_data(TrainConfig.for_task("classify", augment=False, data="fashion-mnist"))
    assert task.batch_augment is None


def test_erasing_is_a_classify_option_kept_in_the_config():
    cfg = TrainConfig.for_task("classify", erasing=0.0)
    assert cfg.options.erasing == 0.0 and cfg.to_dict()["erasing"] == 0.0
    assert TrainConfig.from_dict(cfg.to_dict()).options.erasing == 0.0
    assert TrainConfig.for_task("classify").options.erasing == 0.5
