"""The `cnnkit` command: counts printed by `info`, and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cnnkit.cli import main, parse_input_shape
from cnnkit.errors import UsageError


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_alexnet_counts(capsys):
    code, out, err = run(capsys, "info", "alexnet")
    assert code == 0, err
    assert "61,100,840" in out
    fc_line = [line for line in out.splitlines() if "fully connected" in line.lower()]
    assert fc_line and any(f"{p}." in fc_line[0] or f"{p}%" in fc_line[0] for p in ("96",)), fc_line


def test_info_vgg16_counts(capsys):
    code, out, err = run(capsys, "info", "vgg16")
    assert code == 0, err
    assert "138,357,544" in out
    last_conv = [line for line in out.splitlines() if line.startswith("features.28 ")]
    assert last_conv and last_conv[0].split()[-2:] == ["196", "16"]  # RF and total stride of conv5_3


def test_info_small_model_options(capsys):
    code, out, err = run(capsys, "info", "vgg11_bn", "--input", "1x32x32", "--width", "0.25",
                         "--pool-size", "1", "--num-classes", "10")
    assert code == 0, err
    assert "1,770,154" in out  # the demo's model, as `cnnkit train` reports it


@pytest.mark.parametrize("argv, needle", [
    (["info", "vgg61"], "vgg16"),                       # unknown model: closest names suggested
    (["info", "alexnett"], "alexnet"),
    (["info", "vgg16", "--input", "3x224"], "--input"),  # malformed input
    (["info", "vgg16", "--input", "banana"], "CxHxW"),
    (["info", "vgg16", "--input", "3x16x16"], "32"),    # smaller than the minimum
    (["info", "alexnet", "--input", "3x40x40"], "alexnet"),
    (["info"], "model"),                                 # missing argument
    (["train", "classify", "--epochs", "x"], "--epochs"),
    (["train", "classify", "--data", "/no/such/folder", "--epochs", "1"], "/no/such/folder"),
    (["val", "--weights", "/no/such.pt"], "/no/such.pt"),
    (["predict", "--weights", "/no/such.pt", "x.png"], "/no/such.pt"),
])
def test_user_mistakes_print_one_line_and_exit_2(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and needle in lines[0]


def test_parse_input_shape():
    assert parse_input_shape("3x224x224") == (3, 224, 224)
    assert parse_input_shape("1x28x32") == (1, 28, 32)
    assert parse_input_shape("64") == (3, 64, 64)
    for bad in ("", "3x", "x3x3", "0x3x3", "3x-1x2", "3x2x2x2"):
        with pytest.raises(UsageError):
            parse_input_shape(bad)


def test_help_prints_every_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "classify", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    for flag, default in (("--batch-size", "64"), ("--lr", "0.05"), ("--momentum", "0.9"),
                          ("--weight-decay", "0.0005"), ("--precision", "auto"), ("--img-size", "32")):
        block = out[out.index(flag):]
        assert f"(default: {default})" in block[:400], flag


def test_python_dash_m_and_console_script():
    r = subprocess.run([sys.executable, "-m", "cnnkit", "models"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "vgg16_bn" in r.stdout.split()
    r = subprocess.run([sys.executable, "-m", "cnnkit", "info", "nope"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_predict_imagenet_out_of_the_box(capsys, tmp_path):
    from importlib.resources import files

    photos = files("cnnkit") / "assets" / "photos"
    code, out, err = run(capsys, "predict", "--model", "efficientnet_lite0", "--weights", "imagenet",
                         str(photos / "coffee.jpg"), str(photos / "chelsea.jpg"), "--out", str(tmp_path))
    assert code == 0, err
    coffee = [line for line in out.splitlines() if "coffee.jpg:" in line][0]
    assert coffee.split(": ", 1)[1].startswith("espresso")
    cat = [line for line in out.splitlines() if "chelsea.jpg:" in line][0]
    assert any(c in cat for c in ("tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"))
    assert (tmp_path / "predictions.png").is_file()


def test_weights_list_shows_offline_and_download(capsys):
    code, out, err = run(capsys, "weights", "list")
    assert code == 0, err
    lite = [line for line in out.splitlines() if line.startswith("efficientnet_lite0 ")]
    assert lite and "offline" in lite[0]
    assert any(line.startswith("vgg16 ") and "download" in line for line in out.splitlines())


def test_unknown_weight_name_is_one_line(capsys):
    code, out, err = run(capsys, "predict", "--model", "vgg16", "--weights", "VGG16_Weights.IMAGENET1K_V9", "x.jpg")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "IMAGENET1K_V1" in err


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classify", "detect", "segment"])
def test_demo_quick_runs_each_task(task, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--task", task, "--quick"]) == 0
    out = capsys.readouterr().out
    assert "demo:" in out and (tmp_path / "runs" / task / "demo" / "weights" / "best.pt").is_file()
    assert any((tmp_path / "runs" / task / "demo" / "predict").iterdir())


def test_demo_trains_each_task_to_a_time_budget():
    from cnnkit.demo import DEMO_MINUTES, demo_config, task_demo_config

    configs = {"classify": demo_config(), "detect": task_demo_config("detect"), "segment": task_demo_config("segment")}
    assert sum(DEMO_MINUTES.values()) <= 24  # with validation, prediction and the closing page: about 25 min
    for task, cfg in configs.items():
        assert (cfg.task, cfg.time, cfg.epochs) == (task, DEMO_MINUTES[task], 0)  # the budget alone sets the epochs
    quick = demo_config(quick=True)
    assert (quick.time, quick.epochs) == (0.0, 1)


def test_ctrl_c_during_the_demo_is_one_line(monkeypatch, capsys, tmp_path):
    import signal

    from cnnkit import demo
    from cnnkit.engine.loop import TrainingInterrupted

    def interrupted(**kwargs):
        raise TrainingInterrupted(signal.SIGINT, tmp_path / "last.pt", "detect", 2, 5)

    monkeypatch.setattr(demo, "run_demo", interrupted)
    code, out, err = run(capsys, "demo", "--task", "detect")
    assert code == 130 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "stopped by SIGINT" in lines[0] and "--resume" in lines[0]
