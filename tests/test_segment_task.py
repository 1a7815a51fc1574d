"""The segment task: its loss on hand-computed cases, class weights, and the CLI end to end
(scenes -> train -> val -> predict) on tiny generated data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.cli import main
from cnnkit.data.scenes import generate_scenes
from cnnkit.errors import UsageError
from cnnkit.tasks.segment import SegmentTask, median_frequency_weights, parse_class_weights


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    return generate_scenes(tmp_path_factory.mktemp("scenes") / "s", n_train=12, n_val=4, img_size=64, seed=2)


def test_loss_ignores_255_and_matches_hand_computed_cross_entropy():
    task = SegmentTask()
    # two pixels count: logits (2, 0) with truth 0 -> log(1 + e^-2); (0, 1) with truth 0 -> log(1 + e^1)
    logits = torch.tensor([[[[2.0, 0.0, 5.0]], [[0.0, 1.0, -5.0]]]])  # [1, 2, 1, 3]
    masks = torch.tensor([[[0, 0, 255]]])
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2
    assert task.criterion(logits, masks).item() == pytest.approx(expected, rel=1e-6)
    # class weights: a weighted mean, sum(w_y * l) / sum(w_y)
    task.configure({"img_size": 8, "class_weights": [3.0, 1.0]})
    masks = torch.tensor([[[0, 1, 255]]])
    l0, l1 = math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1))
    assert task.criterion(logits, masks).item() == pytest.approx((3 * l0 + 1 * l1) / 4, rel=1e-6)
    # a batch with only ignore pixels gives zero loss, and backward still works
    logits.requires_grad_(True)
    loss = task.criterion(logits, torch.full((1, 1, 3), 255))
    loss.backward()
    assert loss.item() == 0.0


def test_parse_class_weights():
    assert parse_class_weights("", 3) is None
    assert parse_class_weights("1,2,0.5", 3) == [1.0, 2.0, 0.5]
    assert parse_class_weights("median-frequency", 3) == "median-frequency"
    for bad in ("1,2", "a,b,c", "1,-1,1"):
        with pytest.raises(UsageError):
            parse_class_weights(bad, 3)


def test_median_frequency_weights_by_hand():
    class Masks(torch.utils.data.Dataset):
        transform = None

        def __init__(self):
            # image 0: 6 px of class 0, 2 px of class 1; image 1: 4 px class 0, 4 px class 2
            self.masks = [torch.tensor([0, 0, 0, 0, 0, 0, 1, 1]), torch.tensor([0, 0, 0, 0, 2, 2, 2, 2])]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return None, self.masks[i]

    w = median_frequency_weights(Masks(), 3)
    # f0 = 10/16, f1 = 2/8, f2 = 4/8; median 0.5 -> weights 0.8, 2, 1
    assert w == pytest.approx([0.8, 2.0, 1.0])


def test_train_val_predict_segment(tiny_scenes, tmp_path, capsys):
    code = main(["train", "segment", "--data", str(tiny_scenes), "--model", "unet", "--backbone", "vgg11",
                 "--width", "0.25", "--weights", "none", "--img-size", "64", "--epochs", "2", "--batch-size", "4",
                 "--class-weights", "median-frequency", "--project", str(tmp_path / "runs"), "--name", "s",
                 "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "mIoU" in out
    run = tmp_path / "runs" / "segment" / "s"
    for f in ("metrics.csv", "results.png", "confusion_matrix.png", "val_predictions.png", "weights/best.pt"):
        assert (run / f).is_file(), f
    assert main(["val", "--weights", str(run / "weights" / "best.pt")]) == 0
    assert "mIoU" in capsys.readouterr().out
    pred = tmp_path / "pred"
    val_images = sorted((tiny_scenes / "images" / "val").iterdir())
    assert main(["predict", "--weights", str(run / "weights" / "best.pt"), str(tiny_scenes / "images" / "val"),
                 "--out", str(pred)]) == 0
    masks = sorted((pred / "masks").glob("*.png"))
    overlays = sorted((pred / "overlays").glob("*.png"))
    assert len(masks) == len(overlays) == len(val_images) == 4
    with Image.open(masks[0]) as m, Image.open(val_images[0]) as im:
        assert m.mode == "P" and m.size == im.size  # index mask at the image's own size
        assert int(np.asarray(m).max()) < 11
    with Image.open(overlays[0]) as o:
        assert o.mode == "RGB" and o.size == im.size


def test_segment_cli_errors_are_one_line(tiny_scenes, tmp_path, capsys):
    code = main(["train", "segment", "--data", str(tiny_scenes), "--class-weights", "1,2", "--epochs", "1",
                 "--project", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "class-weights" in err
    code = main(["train", "segment", "--data", str(tiny_scenes), "--upsample", "cubic"])
    assert code == 2


def test_soft_dice_loss_hand_computed():
    from cnnkit.tasks.segment import soft_dice_loss

    even = torch.zeros(1, 2, 1, 2)  # softmax 0.5 / 0.5 at both pixels
    # class 0: sum p = 1, sum y = 1, overlap 0.5 -> (2 * 0.5 + 1) / (1 + 1 + 1) = 2/3; class 1 the same
    assert float(soft_dice_loss(even, torch.tensor([[[0, 1]]]))) == pytest.approx(1 - 2 / 3)
    # the ignored pixel is left out; class 1 is absent from the truth, so only class 0 counts:
    # (2 * 0.5 + 1) / (0.5 + 1 + 1) = 0.8
    assert float(soft_dice_loss(even, torch.tensor([[[0, 255]]]))) == pytest.approx(0.2)
    sure = torch.tensor([[[[30.0, -30.0]], [[-30.0, 30.0]]]])  # predicts class 0 then class 1, certain
    assert float(soft_dice_loss(sure, torch.tensor([[[0, 1]]]))) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_dice_loss(sure, torch.tensor([[[255, 255]]]))) == 0.0  # nothing to score


def test_dice_weight_adds_the_dice_term_to_the_loss():
    from cnnkit.tasks.segment import SegmentTask, soft_dice_loss

    task = SegmentTask()
    task.configure({"img_size": 8, "dice_weight": 0.5})
    logits = torch.randn(2, 3, 8, 8)
    masks = torch.randint(0, 3, (2, 8, 8))
    loss, parts = task.loss(lambda x: logits, None, masks)
    expected = torch.nn.functional.cross_entropy(logits, masks) + 0.5 * soft_dice_loss(logits, masks)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert set(parts) == {"ce", "dice"}
