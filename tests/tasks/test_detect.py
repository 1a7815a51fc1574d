"""The detect task through the CLI: scenes -> train -> val -> predict -> convert, on tiny generated data."""

from __future__ import annotations

import json

import torch

from cnnkit.cli import main


def test_train_val_predict_detect(tiny_scenes, tmp_path, capsys):
    yaml_file = next(tiny_scenes.glob("*.yaml"))
    code = main(["train", "detect", "--data", str(yaml_file), "--model", "yolov1_fast", "--width", "0.125",
                 "--img-size", "96", "--epochs", "2", "--batch-size", "8", "--optimizer", "adamw", "--lr", "0.001",
                 "--project", str(tmp_path / "runs"), "--name", "d", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "AP50" in out
    run = tmp_path / "runs" / "detect" / "d"
    for f in ("metrics.csv", "results.png", "pr_curve.png", "val_predictions.png", "weights/best.pt"):
        assert (run / f).is_file(), f
    assert main(["val", "--weights", str(run / "weights" / "best.pt")]) == 0
    assert "mAP50_voc07" in capsys.readouterr().out
    pred = tmp_path / "pred"
    assert main(["predict", "--weights", str(run / "weights" / "best.pt"), str(tiny_scenes / "images" / "val"),
                 "--out", str(pred), "--conf-threshold", "0.0"]) == 0
    pngs = sorted((pred / "images").glob("*.png"))
    txts = sorted((pred / "labels").glob("*.txt"))
    assert len(pngs) == len(txts) == 6
    results = json.loads((pred / "predictions.json").read_text())
    assert all(set(r) >= {"image_id", "category_id", "bbox", "score"} for r in results)
    for line in txts[0].read_text().splitlines():
        c, *vals = line.split()
        assert 0 <= int(c) < 10 and len(vals) == 5 and all(0 <= float(v) <= 1.0001 for v in vals[:4])


def test_data_convert_cli_round_trip(tiny_scenes, tmp_path, capsys):
    yaml_file = next(tiny_scenes.glob("*.yaml"))
    assert main(["data", "convert", str(yaml_file), str(tmp_path / "coco"), "--to", "coco"]) == 0
    assert main(["data", "convert", str(tmp_path / "coco"), str(tmp_path / "voc"), "--to", "voc"]) == 0
    assert main(["data", "convert", str(tmp_path / "voc"), str(tmp_path / "yolo"), "--to", "yolo"]) == 0
    from cnnkit.data.formats import read_any

    a, b = read_any(yaml_file), read_any(tmp_path / "yolo")
    for split in ("train", "val"):
        ra = sorted(a.splits[split], key=lambda r: r.image_path.name)
        rb = sorted(b.splits[split], key=lambda r: r.image_path.name)
        assert len(ra) == len(rb)
        for x, y in zip(ra, rb):
            assert (x.labels == y.labels).all() and (x.boxes - y.boxes).abs().max() < 1e-3 if len(x.labels) else True


def test_bad_label_line_is_one_line_error(tiny_scenes, tmp_path, capsys):
    import shutil

    data = tmp_path / "bad"
    shutil.copytree(tiny_scenes, data)
    label = sorted((data / "labels" / "train").glob("*.txt"))[0]
    label.write_text(label.read_text() + "3 0.5 0.5 oops\n")
    yaml_file = next(data.glob("*.yaml"))
    argv = ["train", "detect", "--data", str(yaml_file), "--epochs", "1", "--project", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and label.name in err[0]


def test_the_head_stride_is_a_flag_and_the_default_reads_the_stride_16_map(tiny_scenes, tmp_path, capsys):
    from cnnkit.engine.config import TrainConfig
    from cnnkit.engine.inference import load_trained

    assert TrainConfig.for_task("detect").model_kwargs["stride"] == 16
    yaml_file = next(tiny_scenes.glob("*.yaml"))
    common = ["train", "detect", "--data", str(yaml_file), "--weights", "none", "--img-size", "96", "--epochs", "1",
              "--batch-size", "8", "--max-steps", "1", "--precision", "fp32", "--channels-last", "off",
              "--project", str(tmp_path / "runs"), "--no-progress"]
    for stride, grid in ((None, 6), ("32", 3)):
        name = f"s{stride}"
        assert main(common + ["--name", name] + (["--stride", stride] if stride else [])) == 0, capsys.readouterr().err
        last = tmp_path / "runs" / "detect" / name / "weights" / "last.pt"
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        assert ckpt["model"]["kwargs"]["stride"] == int(stride or 16)
        model = load_trained(last, precision="fp32", channels_last="off").model
        assert model.S == grid and model(torch.rand(1, 3, 96, 96)).shape == (1, grid, grid, 5 * 2 + 10)
        assert main(["val", "--weights", str(last)]) == 0
    capsys.readouterr()
    # a model without the option: one line, exit 2
    assert main(common + ["--name", "v1", "--model", "yolov1_fast", "--width", "0.125", "--stride", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stride" in err[0]
