"""`cnnkit export` (ONNX, TorchScript) and `cnnkit predict` with an .onnx file, held against PyTorch's own
outputs: the model of the checkpoint in eval mode and fp32, and the tasks' PyTorch post-processing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import cnnkit  # noqa: E402
from cnnkit.cli import main  # noqa: E402
from cnnkit.engine.checkpoint import save_checkpoint  # noqa: E402
from cnnkit.engine.export import ExportError, export, require_onnx  # noqa: E402
from cnnkit.tasks.yolo_export import unpad_detections  # noqa: E402
from cnnkit.engine.inference import load_trained  # noqa: E402
from cnnkit.models import build_model  # noqa: E402
from cnnkit.tasks.yolo import postprocess  # noqa: E402

PHOTOS = Path(cnnkit.__file__).parent / "assets" / "photos"
TOL = dict(rtol=1e-4, atol=1e-4)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch 2.14 marks torch.jit deprecated

# task -> (model name, kwargs, class names, preprocess): one small model per task
SPECS = {
    "classify": ("vgg11_bn", dict(num_classes=4, in_channels=1, width=0.125, pool_size=1, dropout=0.2),
                 ["t-shirt", "trouser", "bag", "boot"], {"img_size": 32, "channels": 1, "mean": [0.5], "std": [0.25]}),
    "detect": ("yolo", dict(backbone="vgg11", num_classes=3, img_size=96, width=0.125), ["cat", "dog", "cup"],
               {"img_size": 96, "channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3, "S": 3, "B": 2}),
    "segment": ("unet", dict(backbone="vgg11", num_classes=3, img_size=64, width=0.125), ["bg", "a", "b"],
                {"img_size": 64, "channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3}),
}


def _checkpoint(task: str) -> dict:
    """A checkpoint dict as engine/trainer.py `checkpoint_dict` writes it (the entries load_trained reads),
    with BatchNorm statistics that are not the identity, and for YOLO a last layer that gives confident
    boxes (an untrained head scores every box near 0, so no box would survive the threshold)."""
    name, kwargs, names, pre = SPECS[task]
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        if task == "detect":
            last = model.head[-1]
            last.weight.normal_(0, 0.05)
            last.bias.copy_(torch.tensor([0.5, 0.5, 0.5, 0.5, 0.8] * 2 + [0.0] * 3))
    return {"version": cnnkit.__version__, "task": task, "model": {"name": model.cnnkit_name,
            "kwargs": dict(model.cnnkit_kwargs)}, "names": names, "preprocess": dict(pre),
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    out = {}
    for task in SPECS:
        out[task] = root / task / "best.pt"
        save_checkpoint(out[task], _checkpoint(task))
    return out


def _reference(pt: Path):
    t = load_trained(pt, device="cpu", precision="fp32", fold_bn=False)  # the model as exported: BatchNorm kept
    return t.model.eval()


def _random(task: str, n: int, seed: int) -> torch.Tensor:
    pre = SPECS[task][3]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, pre["channels"], pre["img_size"], pre["img_size"], generator=g)


def _run(path: Path, x: torch.Tensor):
    if path.suffix == ".onnx":
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return [torch.from_numpy(o) for o in sess.run(None, {sess.get_inputs()[0].name: x.numpy()})]
    out = torch.jit.load(str(path))(x)
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("task", list(SPECS))
def test_round_trip_matches_pytorch(weights, task, fmt, tmp_path):
    out = tmp_path / f"m.{fmt}"
    r = export(weights[task], format=fmt, out=out, check=True)
    assert r.path == out and out.is_file()
    # export's own check: random at batch 1 and 3, and the four real photos
    assert [label for label, _ in r.checks] == ["random input, batch 1", "random input, batch 3",
                                                "4 photos from cnnkit/assets/photos"]
    assert r.max_abs_diff <= 1e-4
    model = _reference(weights[task])
    for n in (1, 3):  # two batch sizes through one file: the batch is dynamic
        x = _random(task, n, seed=10 + n)
        with torch.no_grad():
            ref = model(x)
        (got,) = _run(out, x)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, **TOL)


def test_onnx_metadata_holds_what_predict_needs(weights, tmp_path):
    import onnx

    out = tmp_path / "d.onnx"
    export(weights["detect"], out=out, check=False, with_nms=True, conf_threshold=0.3, max_det=7)
    props = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert props["task"] == "detect" and props["names"] == ["cat", "dog", "cup"]
    assert props["preprocess"]["img_size"] == 96 and props["preprocess"]["mean"] == [0.0] * 3
    assert props["model"]["name"] == "yolo" and props["with_nms"] is True
    assert props["nms"] == {"conf_threshold": 0.3, "iou_threshold": 0.5, "max_det": 7}
    assert props["geometry"] == {"S": 3, "B": 2, "C": 3, "img_size": 96}
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["detections", "count"]
    det, count = sess.run(None, {"images": np.random.rand(2, 3, 96, 96).astype(np.float32)})
    assert det.shape == (2, 7, 6) and count.shape == (2,)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_with_nms_equals_pytorch_postprocess(weights, fmt, tmp_path):
    out = tmp_path / f"nms.{fmt}"
    export(weights["detect"], format=fmt, out=out, with_nms=True, check=False)
    model = _reference(weights["detect"])
    total = 0
    for n in (1, 3):
        x = torch.rand(n, 3, 96, 96, generator=torch.Generator().manual_seed(n))
        det, count = _run(out, x)
        assert det.shape == (n, 100, 6) and count.shape == (n,)
        with torch.no_grad():
            ref = postprocess(model(x), S=3, B=2, C=3, img_size=96, conf_threshold=0.25, iou_threshold=0.5,
                              max_det=100)
        for got, want, d, c in zip(unpad_detections(det, count), ref, det, count):
            assert len(got["scores"]) == len(want["scores"])
            torch.testing.assert_close(got["boxes"], want["boxes"], **TOL)
            torch.testing.assert_close(got["scores"], want["scores"], **TOL)
            assert torch.equal(got["labels"], want["labels"])
            assert torch.all(d[int(c):] == 0)  # padding rows are zeros
            total += len(want["scores"])
    assert total > 10  # the comparison saw real detections


def _predict(tmp_path: Path, weights: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    assert main(["predict", "--weights", str(weights), "--out", str(out), "--device", "cpu",
                 "--precision", "fp32", *extra, str(PHOTOS)]) == 0
    return out


def test_predict_onnx_equals_pt_classify(weights, tmp_path):
    pt = weights["classify"]
    assert main(["export", "--weights", str(pt)]) == 0
    onnx_file = pt.with_suffix(".onnx")  # the default: beside the weights, same stem
    assert onnx_file.is_file()
    a = json.loads((_predict(tmp_path, pt, "pt", "--top-k", "3") / "predictions.json").read_text())
    b = json.loads((_predict(tmp_path, onnx_file, "onnx", "--top-k", "3") / "predictions.json").read_text())
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert ra["path"] == rb["path"]
        assert [t["class"] for t in ra["top"]] == [t["class"] for t in rb["top"]]
        np.testing.assert_allclose([t["prob"] for t in ra["top"]], [t["prob"] for t in rb["top"]], atol=2e-6)


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.loadtxt(p, ndmin=2) for p in sorted((folder / "labels").glob("*.txt"))}


@pytest.mark.parametrize("with_nms", [False, True])
def test_predict_onnx_equals_pt_detect(weights, tmp_path, with_nms):
    pt = weights["detect"]
    onnx_file = tmp_path / "det.onnx"
    assert main(["export", "--weights", str(pt), "--out", str(onnx_file)] + (["--with-nms"] if with_nms else [])) == 0
    a, b = _labels(_predict(tmp_path, pt, "pt")), _labels(_predict(tmp_path, onnx_file, "onnx"))
    assert list(a) == list(b) and len(a) == 4
    assert sum(len(v) for v in a.values()) > 10
    for k in a:  # class cx cy w h score per line, same order
        assert a[k].shape == b[k].shape
        assert np.array_equal(a[k][:, 0], b[k][:, 0])
        np.testing.assert_allclose(a[k][:, 1:], b[k][:, 1:], atol=1e-4)


def test_predict_onnx_equals_pt_segment(weights, tmp_path):
    from PIL import Image

    pt = weights["segment"]
    onnx_file = tmp_path / "seg.onnx"
    assert main(["export", "--weights", str(pt), "--out", str(onnx_file)]) == 0
    a, b = _predict(tmp_path, pt, "pt"), _predict(tmp_path, onnx_file, "onnx")
    masks = sorted(p.name for p in (a / "masks").glob("*.png"))
    assert len(masks) == 4
    for name in masks:
        ma, mb = np.array(Image.open(a / "masks" / name)), np.array(Image.open(b / "masks" / name))
        assert ma.shape == mb.shape
        assert (ma == mb).mean() > 0.9999  # an argmax may flip only where two logits tie within 1e-6
        assert len(np.unique(ma)) > 1


def test_export_errors_are_one_line_exit_2(weights, tmp_path, capsys):
    assert main(["export", "--weights", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.pt" in err and "not found" in err and len(err.splitlines()) == 1
    assert main(["export", "--weights", str(weights["classify"]), "--format", "tflite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--format" in err and "onnx" in err and len(err.splitlines()) == 1
    assert main(["export", "--weights", str(weights["classify"]), "--with-nms", "--out", str(tmp_path / "c.onnx")]) == 2
    assert "--with-nms does not apply to a classify checkpoint" in capsys.readouterr().err
    assert main(["predict", "--weights", str(tmp_path / "nope.onnx"), str(PHOTOS)]) == 2
    assert "nope.onnx" in capsys.readouterr().err


def test_missing_onnxruntime_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(ExportError, match=r"pip install 'cnnkit\[export\]'"):
        require_onnx()


@pytest.mark.parametrize("in_hw,out_hw", [((7, 7), (3, 3)), ((2, 2), (4, 4)), ((5, 8), (6, 3)), ((6, 6), (1, 1))])
def test_pool_as_matmul_equals_adaptive_avg_pool(in_hw, out_hw):
    from cnnkit.engine.export import PoolAsMatmul

    x = torch.randn(2, 3, *in_hw)
    torch.testing.assert_close(PoolAsMatmul(in_hw, out_hw)(x), torch.nn.AdaptiveAvgPool2d(out_hw)(x), rtol=1e-6, atol=1e-6)


def test_yolo_on_timm_backbone_exports_to_onnx(tmp_path):
    """The default detector's layout (YOLO head on timm's EfficientNet-Lite0): its adaptive pool is what
    the TorchScript ONNX exporter cannot take as it is."""
    model = build_model("yolo", backbone="efficientnet_lite0", num_classes=2, img_size=64, width=0.125)
    pt = tmp_path / "y.pt"
    save_checkpoint(pt, {"task": "detect", "model": {"name": model.cnnkit_name, "kwargs": dict(model.cnnkit_kwargs)},
                         "names": ["a", "b"], "preprocess": {"img_size": 64, "channels": 3, "mean": [0.0] * 3,
                                                             "std": [1.0] * 3}, "state_dict": model.state_dict()})
    r = export(pt, out=tmp_path / "y.onnx", batch_size=2)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        ref = _reference(pt)(x)
    torch.testing.assert_close(_run(r.path, x)[0], ref, **TOL)


def test_layer_without_onnx_support_is_a_clear_error(tmp_path, capsys):
    model = build_model("deconvnet", num_classes=2, img_size=32, width=0.0625)
    pt = tmp_path / "d.pt"
    save_checkpoint(pt, {"task": "segment", "model": {"name": model.cnnkit_name, "kwargs": dict(model.cnnkit_kwargs)},
                         "names": ["a", "b"], "preprocess": {"img_size": 32, "channels": 3, "mean": [0.0] * 3,
                                                             "std": [1.0] * 3}, "state_dict": model.state_dict()})
    assert main(["export", "--weights", str(pt)]) == 2
    err = capsys.readouterr().err.strip()
    assert "max_unpool2d" in err and "--format torchscript" in err and len(err.splitlines()) == 1
    assert main(["export", "--weights", str(pt), "--format", "torchscript"]) == 0
    assert pt.with_suffix(".ts").is_file()
