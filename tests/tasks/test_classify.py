"""The classify task's own pieces: its training transform and its options."""

from __future__ import annotations

from torchvision.transforms import v2

from cnnkit.engine.config import TrainConfig
from cnnkit.tasks.classify import train_transform


def _erasing(tf) -> list[float]:
    return [t.p for t in tf.transforms if isinstance(t, v2.RandomErasing)]


def test_erasing_probability_reaches_the_small_image_transform():
    assert _erasing(train_transform(32, 28, True)) == [0.5]  # the default: Zhong et al.'s p = 0.5
    assert _erasing(train_transform(32, 28, True, erasing=0.25)) == [0.25]
    assert _erasing(train_transform(32, 28, True, erasing=0.0)) == []


def test_erasing_is_a_classify_option_kept_in_the_config():
    cfg = TrainConfig.for_task("classify", erasing=0.0)
    assert cfg.options.erasing == 0.0 and cfg.to_dict()["erasing"] == 0.0
    assert TrainConfig.from_dict(cfg.to_dict()).options.erasing == 0.0
    assert TrainConfig.for_task("classify").options.erasing == 0.5
