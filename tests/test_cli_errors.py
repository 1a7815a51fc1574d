"""Every subcommand given missing, contradictory or out-of-range options: one line on stderr, exit
status 2, no traceback, and the line names what is wrong (issue #8). No row trains a model: each
is refused before any data is loaded or any run folder is made."""

from __future__ import annotations

import pytest

from cnnkit.cli import main

T = ["train", "classify"]

ROWS = [
    # train: numbers out of range
    (T + ["--epochs", "0"], "--epochs"),
    (T + ["--epochs", "-3"], "--epochs"),
    (T + ["--epochs", "2.5"], "--epochs"),
    (T + ["--batch-size", "0"], "--batch-size"),
    (T + ["--img-size", "0"], "--img-size"),
    (T + ["--img-size", "100001"], "--img-size"),
    (T + ["--img-size", "-32"], "--img-size"),
    (T + ["--lr", "-0.1"], "--lr"),
    (T + ["--lr", "0"], "--lr"),
    (T + ["--lr", "nan"], "--lr"),
    (T + ["--lr", "inf"], "--lr"),
    (T + ["--momentum", "1.5"], "--momentum"),
    (T + ["--weight-decay", "-1"], "--weight-decay"),
    (T + ["--warmup-epochs", "-1"], "--warmup-epochs"),
    (T + ["--gamma", "0"], "--gamma"),
    (T + ["--label-smoothing", "1"], "--label-smoothing"),
    (T + ["--ema-decay", "2"], "--ema-decay"),
    (T + ["--clip-grad", "-1"], "--clip-grad"),
    (T + ["--workers", "-5"], "--workers"),
    (T + ["--width", "0"], "--width"),
    (T + ["--dropout", "1.5"], "--dropout"),
    (T + ["--pool-size", "0"], "--pool-size"),
    (T + ["--unfreeze-at", "-1"], "--unfreeze-at"),
    (T + ["--backbone-lr-scale", "-1"], "--backbone-lr-scale"),
    (T + ["--train-subset", "-1"], "--train-subset"),
    (T + ["--max-steps", "-1"], "--max-steps"),
    (T + ["--steps", "0"], "--steps"),
    (T + ["--optimizer", "adam"], "--optimizer"),
    (T + ["--precision", "fp8"], "--precision"),
    (T + ["--schedule", "linear"], "--schedule"),
    (T + ["--on-bad-image", "ignore"], "--on-bad-image"),
    (["train", "detect", "--on-bad-label", "drop"], "--on-bad-label"),
    (["train", "segment", "--upsample", "cubic"], "--upsample"),
    (["train", "segment", "--class-weights", "a,b"], "--class-weights"),
    (T + ["--no-such-flag"], "--no-such-flag"),
    (["train"], "task"),
    (["train", "regress"], "regress"),
    # train: unknown or missing things
    (T + ["--model", "nosuchnet"], "nosuchnet"),
    (T + ["--model", "vgg11", "--weights", "/no/such/weights.pt"], "/no/such/weights.pt"),
    (T + ["--weights", "NOSUCH_Weights.X"], "NOSUCH_Weights.X"),
    (T + ["--resume", "/no/such/last.pt"], "/no/such/last.pt"),
    (T + ["--data", "/no/such/folder"], "/no/such/folder"),
    (T + ["--data", "fashion-mnst"], "fashion-mnist"),  # a typo: the closest name suggested
    (["train", "detect", "--data", "scenez"], "scenes"),
    (["train", "segment", "--data", "/no/such/seg"], "/no/such/seg"),
    (T + ["--device", "tpu"], "tpu"),
    # train: a model or a flag of another task (issue #17): one line naming what the task takes
    (["train", "segment", "--model", "yolov1"], "the segment task trains: deconvnet, fcn16s, fcn32s, fcn8s, unet"),
    (["train", "classify", "--model", "unet"], "unet is a segment model"),
    (["train", "detect", "--model", "vgg11"], "the detect task trains: yolo, yolov1"),
    (["train", "detect", "--label-smoothing", "0.1"], "--label-smoothing is an option of the classify task"),
    (["train", "segment", "--on-bad-label", "skip"], "--on-bad-label is an option of the detect task"),
    (T + ["--dice-weight", "1"], "--dice-weight is an option of the segment task"),
    (["train", "detect", "--copy-paste", "0.5"], "the detect task's own options: --on-bad-label"),
    (["train", "segment", "--train-subset", "10"], "--train-subset is an option of the classify task"),
    (["train", "detect", "--erasing", "0"], "--erasing is an option of the classify task"),
    (T + ["--erasing", "1.5"], "--erasing"),
    (["predict", "--weights", "x.pt", "--bogus-flag", "a.png"], "--bogus-flag"),
    # val / predict / info / data / weights / demo
    (["val"], "--weights"),
    (["val", "--weights", "/no/such.pt"], "/no/such.pt"),
    (["val", "--weights", "x.pt", "--batch-size", "0"], "--batch-size"),
    (["predict", "--weights", "x.pt"], "IMAGES_OR_FOLDERS"),
    (["predict", "img.png"], "--weights"),
    (["predict", "--weights", "/no/such.pt", "x.png"], "/no/such.pt"),
    (["predict", "--weights", "x.pt", "--top-k", "0", "a.png"], "--top-k"),
    (["predict", "--weights", "x.pt", "--conf-threshold", "1.5", "a.png"], "--conf-threshold"),
    (["predict", "--weights", "x.pt", "--batch-size", "-1", "a.png"], "--batch-size"),
    (["predict", "--model", "nosuchnet", "--weights", "imagenet", "a.png"], "nosuchnet"),
    (["info"], "model"),
    (["info", "nosuchnet"], "nosuchnet"),
    (["info", "vgg11", "--num-classes", "0"], "--num-classes"),
    (["info", "vgg11", "--width", "-1"], "--width"),
    (["info", "vgg11", "--input", "0x0x0"], "--input"),
    (["data"], "data_command"),
    (["data", "convert", "a", "b", "--to", "xml"], "--to"),
    (["data", "convert", "a", "b"], "--to"),
    (["data", "convert", "/no/such/src", "/tmp/cnnkit-never-written", "--to", "coco"], "/no/such/src"),
    (["data", "check", "fashion-mnist"], "--task"),
    (["data", "check", "x", "--task", "regress"], "--task"),
    (["data", "scenes", "/tmp/cnnkit-never-written", "--n-train", "0"], "--n-train"),
    (["data", "scenes", "/tmp/cnnkit-never-written", "--img-size", "8"], "--img-size"),
    (["weights"], "weights_command"),
    (["export"], "--weights"),
    (["export", "--weights", "/no/such.pt"], "/no/such.pt"),
    (["export", "--weights", "x.pt", "--format", "tflite"], "--format"),
    (["report"], "RUN_DIR"),
    (["report", "/no/such/run"], "/no/such/run"),
    (["report", "/no/such/run", "--gallery", "-1"], "--gallery"),
    (["explain"], "topic"),
    (["explain", "nosuchtopic"], "nosuchtopic"),
    (["explain", "conv", "--stride", "0"], "stride"),
    (["explain", "receptive-field", "nosuchnet"], "nosuchnet"),
    (["demo", "--task", "regress"], "--task"),
    (["nosuchcommand"], "nosuchcommand"),
    ([], "command"),
]


@pytest.mark.parametrize("argv, needle", ROWS, ids=[" ".join(r[0]) or "(none)" for r in ROWS])
def test_bad_options_give_one_line_and_exit_2(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)  # a row that wrongly started a run would write here, not in the repo
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (code, out[-500:], err[-500:])
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cnnkit: error: ")
    assert "Traceback" not in err + out
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_a_multi_line_library_message_still_prints_one_line(capsys, tmp_path):
    """A YAML error from PyYAML spans lines; the CLI joins it into one."""
    (tmp_path / "d.yaml").write_text("train: [a\nnames: {b\n")
    code = main(["data", "check", str(tmp_path / "d.yaml"), "--task", "detect"])
    assert code == 2  # the check reports it as a fatal problem, in its summary
    code = main(["data", "convert", str(tmp_path / "d.yaml"), str(tmp_path / "out"), "--to", "coco"])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "d.yaml" in err, err


@pytest.mark.parametrize("task, model", [("segment", "yolov1"), ("classify", "unet"), ("detect", "vgg11")])
def test_a_model_of_another_task_is_refused_before_any_data_is_read(task, model, monkeypatch, capsys):
    from cnnkit.taskapi import task_class

    def no_data(self, cfg):
        raise AssertionError("data was read")

    monkeypatch.setattr(task_class(task), "build_data", no_data)
    assert main(["train", task, "--model", model]) == 2
    assert "data was read" not in capsys.readouterr().err
