"""Results files that other tools evaluate: `cnnkit val --save-json`, `cnnkit predict` (predictions.json,
YOLO txt) and `cnnkit val --save-masks` hold the dataset's own ids and exactly what val scores.

The reference is faster-coco-eval's COCOeval on the ground-truth JSON file as it lies on disk (the COCO
source itself, or what `cnnkit data convert --to coco` wrote); its AP and AP50 must equal cnnkit val's.
Data: coloured rectangles on a dark background (class = colour), 160 x 120 images (not the network's
square), a Fast YOLO at quarter width trained 8 short epochs on them (a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.cli import main
from cnnkit.data.formats import coco_ids, read_coco, read_yolo
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.inference import validate
from cnnkit.engine.trainer import fit

NAMES = ["red", "green", "blue"]
COLOURS = [(230, 40, 40), (40, 230, 40), (40, 60, 240)]
CATEGORY_IDS = [1, 3, 90]  # COCO-style: not 1..K
W, H = 160, 120


def rectangle_scenes(n: int = 8, seed: int = 0) -> list[tuple[np.ndarray, list[tuple[int, list[int]]]]]:
    """n images with one or two rectangles each: (pixels H x W x 3, [(class, [x, y, w, h])])."""
    rng = np.random.default_rng(seed)
    scenes = []
    for k in range(n):
        img = rng.integers(0, 40, (H, W, 3)).astype(np.uint8)
        boxes = []
        for j in range(1 + k % 2):  # a second rectangle goes into the right half
            bw, bh = int(rng.integers(40, 70)), int(rng.integers(30, 55))
            x = min(int(rng.integers(0, W // 2 - bw // 2)) + (W // 2 if j else 0), W - bw)
            y = int(rng.integers(0, H - bh))
            c = (k + j) % 3
            img[y:y + bh, x:x + bw] = COLOURS[c]
            boxes.append((c, [x, y, bw, bh]))
        scenes.append((img, boxes))
    return scenes


def write_coco_data(root: Path, scenes, reps: dict[str, int], first_id: dict[str, int]) -> Path:
    """A COCO dataset written by hand: image ids first_id, +7, +14 ...; category ids 1, 3, 90 (listed
    out of order); the images listed in reverse id order. Each split repeats the scenes reps times."""
    for split, n in reps.items():
        images, anns = [], []
        for r in range(n):
            for k, (img, boxes) in enumerate(scenes):
                name, image_id = f"{split}_{r}_{k}.png", first_id[split] + 7 * len(images)
                (root / "images" / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(root / "images" / split / name)
                images.append({"id": image_id, "file_name": name, "width": W, "height": H})
                for c, b in boxes:
                    anns.append({"id": 500 + len(anns), "image_id": image_id, "category_id": CATEGORY_IDS[c],
                                 "bbox": b, "area": b[2] * b[3], "iscrowd": 0})
        doc = {"images": images[::-1], "annotations": anns,
               "categories": [{"id": i, "name": n} for i, n in sorted(zip(CATEGORY_IDS, NAMES), reverse=True)]}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def write_yolo_data(root: Path, scenes, reps: dict[str, int]) -> Path:
    for split, n in reps.items():
        for r in range(n):
            for k, (img, boxes) in enumerate(scenes):
                (root / "images" / split).mkdir(parents=True, exist_ok=True)
                (root / "labels" / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(root / "images" / split / f"{split}_{r}_{k}.png")
                (root / "labels" / split / f"{split}_{r}_{k}.txt").write_text("".join(
                    f"{c} {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} {w / W:.6f} {h / H:.6f}\n"
                    for c, (x, y, w, h) in boxes))
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [red, green, blue]\n")
    return root / "data.yaml"


def train_tiny(data: str | Path, project: Path, name: str = "d") -> Path:
    """A few seconds: Fast YOLO at quarter width, 128 px (S = 2), 8 epochs of 4 steps; returns best.pt."""
    cfg = TrainConfig.for_task("detect", data=str(data), model="yolov1_fast",
                               model_kwargs={"width": 0.25, "dropout": 0.0}, weights=None, img_size=128, epochs=8,
                               batch_size=8, optimizer="adamw", lr=2e-3, warmup_epochs=0, augment=False, ema=False,
                               freeze_early=0, precision="fp32", workers=0, project=str(project), name=name,
                               plots=False, progress=False)
    return fit(cfg, log=lambda *a: None).run_dir / "weights" / "best.pt"


def reference_ap(truth: Path, results: Path) -> tuple[float, float]:
    """(AP, AP50) of a results file against a ground-truth file, by faster-coco-eval's COCOeval."""
    from faster_coco_eval import COCO, COCOeval_faster

    gt = COCO(str(truth))
    evaluator = COCOeval_faster(gt, gt.loadRes(str(results)), iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return float(evaluator.stats[0]), float(evaluator.stats[1])


@pytest.fixture(scope="module", autouse=True)
def one_thread_here():
    """One intra-op thread for this module (see conftest's one_thread): the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    data = write_coco_data(root / "data", rectangle_scenes(), {"train": 4, "val": 1}, {"train": 1000, "val": 5000})
    return data, train_tiny(data, root / "runs")


@pytest.fixture(scope="module")
def yolo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo")
    data = write_yolo_data(root / "data", rectangle_scenes(seed=1), {"train": 4, "val": 1})
    return data, train_tiny(data, root / "runs")


def val_json(weights: Path, out: Path, data=None) -> tuple[dict, Path]:
    metrics = validate(weights, data=None if data is None else str(data), precision="fp32", workers=0,
                       out_dir=out, save=("json",), log=lambda *a: None)
    return metrics, out / "predictions.json"


def predict_json(weights: Path, images: Path, out: Path, *extra: str) -> Path:
    argv = ["predict", "--weights", str(weights), str(images), "--conf-threshold", "0.001", "--precision", "fp32",
            "--out", str(out), "--show", "0", *extra]
    assert main(argv) == 0
    return out / "predictions.json"


# ---------------------------------------------------------------- (a) a COCO source with its own ids

def test_coco_source_ids_and_ap_match_the_reference(coco_run, tmp_path, capsys):
    data, weights = coco_run
    ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    assert ckpt["preprocess"]["category_ids"] == CATEGORY_IDS

    metrics, results = val_json(weights, tmp_path / "val")
    entries = json.loads(results.read_text())
    assert {e["image_id"] for e in entries} <= {5000 + 7 * k for k in range(8)}
    assert {e["category_id"] for e in entries} <= set(CATEGORY_IDS) and len(entries) > 8
    assert metrics["AP50"] > 0, "a model that finds nothing would make the comparison empty"
    truth = data / "annotations" / "instances_val.json"
    ap, ap50 = reference_ap(truth, results)
    figures = f"cnnkit val AP {metrics['AP']:.6f} AP50 {metrics['AP50']:.6f}, reference AP {ap:.6f} AP50 {ap50:.6f}"
    assert ap == pytest.approx(metrics["AP"], abs=1e-4) and ap50 == pytest.approx(metrics["AP50"], abs=1e-4), figures

    predicted = predict_json(weights, data / "images" / "val", tmp_path / "pred", "--data", str(data))
    assert "as in the COCO file of" in capsys.readouterr().out
    assert reference_ap(truth, predicted) == pytest.approx((metrics["AP"], metrics["AP50"]), abs=1e-4)


# ---------------------------------------------------------------- (b) a YOLO source through `data convert`

def test_yolo_source_converted_to_coco_and_ap_match_the_reference(yolo_run, tmp_path, capsys):
    data_yaml, weights = yolo_run
    assert main(["data", "convert", str(data_yaml), str(tmp_path / "coco"), "--to", "coco"]) == 0
    truth = tmp_path / "coco" / "annotations" / "instances_val.json"
    metrics, results = val_json(weights, tmp_path / "val")
    assert metrics["AP50"] > 0
    ap, ap50 = reference_ap(truth, results)
    figures = f"cnnkit val AP {metrics['AP']:.6f} AP50 {metrics['AP50']:.6f}, reference AP {ap:.6f} AP50 {ap50:.6f}"
    assert ap == pytest.approx(metrics["AP"], abs=1e-4) and ap50 == pytest.approx(metrics["AP50"], abs=1e-4), figures
    predicted = predict_json(weights, data_yaml.parent / "images" / "val", tmp_path / "pred", "--data", str(data_yaml))
    assert reference_ap(truth, predicted) == pytest.approx((metrics["AP"], metrics["AP50"]), abs=1e-4)
    # the converted COCO dataset is the same data: validating on it gives the same figures and file
    again, results2 = val_json(weights, tmp_path / "val2", data=tmp_path / "coco")
    assert (again["AP"], again["AP50"]) == pytest.approx((metrics["AP"], metrics["AP50"]), abs=1e-9)
    assert json.loads(results2.read_text()) == json.loads(results.read_text())


def test_converter_and_results_share_one_numbering(coco_run, tmp_path):
    data, _ = coco_run
    source = read_coco(data)
    ids = coco_ids(source)
    assert ids.category_ids == CATEGORY_IDS
    assert sorted(ids.image_ids["val"]) == [5000 + 7 * k for k in range(8)]
    assert main(["data", "convert", str(data), str(tmp_path / "coco2"), "--to", "coco"]) == 0
    doc = json.loads((tmp_path / "coco2" / "annotations" / "instances_val.json").read_text())
    assert [c["id"] for c in doc["categories"]] == CATEGORY_IDS and [c["name"] for c in doc["categories"]] == NAMES
    original = {i["file_name"]: i["id"] for i in json.loads((data / "annotations" / "instances_val.json").read_text())["images"]}
    assert {i["file_name"]: i["id"] for i in doc["images"]} == original
    # YOLO has no ids: 1..K and 1..N in the split's order, as coco_ids says
    assert main(["data", "convert", str(data), str(tmp_path / "yolo"), "--to", "yolo"]) == 0
    yolo = read_yolo(tmp_path / "yolo")
    assert coco_ids(yolo).category_ids == [1, 2, 3] and coco_ids(yolo).image_ids["val"] == list(range(1, 9))


def test_every_source_format_gives_its_images_the_ids_convert_writes(yolo_run, coco_run, tmp_path):
    """What the results writers use (the datasets' coco_image_ids, the checkpoint's category ids) is what
    `data convert --to coco` writes, for YOLO, VOC, COCO and a plain folder without a val split."""
    from cnnkit.data.detection import load_detection_data

    data_yaml, _ = yolo_run
    assert main(["data", "convert", str(data_yaml), str(tmp_path / "voc"), "--to", "voc"]) == 0
    folder = tmp_path / "folder"  # images/ + labels/ + classes.txt, no splits: val is held out of train
    for k, (img, boxes) in enumerate(rectangle_scenes(n=10, seed=3)):
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / "images" / f"f{k}.png")
        (folder / "labels" / f"f{k}.txt").write_text("".join(
            f"{c} {(x + w / 2) / W} {(y + h / 2) / H} {w / W} {h / H}\n" for c, (x, y, w, h) in boxes))
    (folder / "classes.txt").write_text("red\ngreen\nblue\n")
    sources = {"yolo": data_yaml, "voc": tmp_path / "voc", "coco": coco_run[0], "folder": folder}
    for kind, src in sources.items():
        out = tmp_path / f"as_coco_{kind}"
        assert main(["data", "convert", str(src), str(out), "--to", "coco"]) == 0
        loaded = load_detection_data(src)
        split = loaded.val.split
        assert split == ("train" if kind == "folder" else "val")
        doc = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        id_of = {i["file_name"]: i["id"] for i in doc["images"]}
        assert loaded.val.coco_image_ids == [id_of[r.image_path.name] for r in loaded.val.records], kind
        assert loaded.coco_ids().category_ids == [c["id"] for c in doc["categories"]], kind


@pytest.mark.parametrize("images, categories, words", [
    ([{"id": 7, "file_name": "a.png"}, {"id": 7, "file_name": "b.png"}], None, "repeats id 7"),
    ([{"id": 7.5, "file_name": "a.png"}], None, "key 'id' is malformed"),
    ([{"id": "7", "file_name": "a.png"}], None, "key 'id' is malformed"),
    (None, [{"id": 3, "name": "red"}, {"id": 3, "name": "blue"}], "id 3 repeats"),
    (None, [{"id": 1.0, "name": "red"}], "integer 'id'"),
])
def test_duplicate_or_non_integer_coco_ids_stay_refused(tmp_path, images, categories, words):
    from cnnkit.errors import DataError

    Image.new("RGB", (W, H)).save(tmp_path / "a.png")
    Image.new("RGB", (W, H)).save(tmp_path / "b.png")
    doc = {"images": images or [{"id": 7, "file_name": "a.png"}], "annotations": [],
           "categories": categories or [{"id": 1, "name": "red"}]}
    (tmp_path / "instances_train.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=words):
        read_coco(tmp_path / "instances_train.json")


def test_generated_scenes_coco_files_hold_the_ids_of_coco_ids(tmp_path):
    from cnnkit.data.scenes import generate_scenes

    root = generate_scenes(tmp_path / "s", n_train=4, n_val=3, img_size=64, seed=0)
    ids = coco_ids(read_yolo(root / "data.yaml"))  # what --data scenes reads
    for split in ("train", "val"):
        doc = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        names = [r.image_path.name for r in read_yolo(root / "data.yaml").splits[split]]
        assert {i["file_name"]: i["id"] for i in doc["images"]} == dict(zip(names, ids.image_ids[split]))
        assert [c["id"] for c in doc["categories"]] == ids.category_ids


# ---------------------------------------------------------------- (c) convert round trip

def test_convert_yolo_coco_voc_yolo_keeps_boxes_and_classes(yolo_run, tmp_path):
    data_yaml, _ = yolo_run
    steps = [("coco", tmp_path / "coco"), ("voc", tmp_path / "voc"), ("yolo", tmp_path / "yolo")]
    src = data_yaml
    for to, dst in steps:
        assert main(["data", "convert", str(src), str(dst), "--to", to]) == 0
        src = dst
    a, b = read_yolo(data_yaml), read_yolo(tmp_path / "yolo")
    assert a.names == b.names == NAMES
    for split in ("train", "val"):
        ra = {r.image_path.name: r for r in a.splits[split]}
        rb = {r.image_path.name: r for r in b.splits[split]}
        assert ra.keys() == rb.keys()
        for name, x in ra.items():
            y = rb[name]
            assert torch.equal(x.labels, y.labels), name
            assert (x.boxes - y.boxes).abs().max() <= 1.0, name  # VOC holds whole pixels


# ---------------------------------------------------------------- (d) the YOLO txt files of predict

def test_predicted_yolo_txt_read_back_equal_the_json(coco_run, tmp_path):
    data, weights = coco_run
    results = predict_json(weights, data / "images" / "val", tmp_path / "pred", "--data", str(data))
    entries = json.loads(results.read_text())
    back = read_yolo(tmp_path / "pred", with_scores=True)  # images/*.png, labels/*.txt, classes.txt
    assert back.names == NAMES
    label_of = {cid: k for k, cid in enumerate(CATEGORY_IDS)}
    records = {r.image_path.name: r for r in back.splits["train"]}
    assert len(records) == 8
    for name, rec in records.items():
        mine = [e for e in entries if e["file_name"] == name]
        assert len(mine) == len(rec.labels) > 0
        assert (rec.width, rec.height) == (W, H)
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (e["bbox"] for e in mine)], dtype=torch.float64)
        assert (rec.boxes - boxes).abs().max() < 1e-3
        assert rec.labels.tolist() == [label_of[e["category_id"]] for e in mine]
        assert (rec.scores - torch.tensor([e["score"] for e in mine], dtype=torch.float64)).abs().max() <= 5e-6
    with pytest.raises(Exception, match="6 fields"):  # training data never takes the score column
        read_yolo(tmp_path / "pred")


# ---------------------------------------------------------------- (f) loose images, old checkpoints, wrong flags

def test_loose_images_get_running_ids_and_one_line(coco_run, tmp_path, capsys):
    data, weights = coco_run
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("val_0_3.png", "val_0_5.png"):
        (loose / f"photo_{name}").write_bytes((data / "images" / "val" / name).read_bytes())
    entries = json.loads(predict_json(weights, loose, tmp_path / "p1").read_text())
    out = capsys.readouterr().out.splitlines()
    said = [line for line in out if line.startswith("predictions.json:")]
    assert len(said) == 1 and "1..2 in file order" in said[0] and "--data DATA" in said[0]
    assert {e["image_id"] for e in entries} == {1, 2} and {e["category_id"] for e in entries} <= set(CATEGORY_IDS)

    # images the dataset does not hold: --data cannot give them ids, one line and exit 2
    argv = ["predict", "--weights", str(weights), str(loose), "--data", str(data), "--out", str(tmp_path / "p2")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "photo_val_0_3.png" in err[0] and "no image of this name" in err[0]
    assert "without --data" in err[0]

    # a checkpoint from before category ids were recorded: label + 1, said in one line
    old = torch.load(weights, map_location="cpu", weights_only=True)
    del old["preprocess"]["category_ids"]
    torch.save(old, tmp_path / "old.pt")
    entries = json.loads(predict_json(tmp_path / "old.pt", loose, tmp_path / "p3").read_text())
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("predictions.json:")]
    assert len(said) == 1 and "class index + 1" in said[0]
    assert {e["category_id"] for e in entries} <= {1, 2, 3}

    # a flag for another task: one line, exit 2
    assert main(["val", "--weights", str(weights), "--save-masks", "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--save-masks" in err[0] and "--save-json" in err[0]


# ---------------------------------------------------------------- (e) segmentation masks

def write_seg_data(root: Path, n: dict[str, int], seed: int = 0) -> Path:
    """80 x 60 images (the network sees 64 x 64), masks 0 = background, 1 = red, 2 = blue rectangles."""
    rng = np.random.default_rng(seed)
    for split, count in n.items():
        for k in range(count):
            img = rng.integers(0, 40, (60, 80, 3)).astype(np.uint8)
            mask = np.zeros((60, 80), np.uint8)
            for c in (1, 2):
                x, y = int(rng.integers(0, 50)), int(rng.integers(0, 35))
                img[y:y + 25, x:x + 30] = COLOURS[0 if c == 1 else 2]
                mask[y:y + 25, x:x + 30] = c
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "images" / split / f"s{k}.png")
            Image.fromarray(mask, "L").save(root / "masks" / split / f"s{k}.png")
    (root / "classes.txt").write_text("background\nred\nblue\n")
    return root


def test_val_save_masks_are_the_masks_val_scores(tmp_path, capsys):
    from cnnkit.engine.inference import load_trained
    from cnnkit.tasks.segmentation_metrics import confusion_matrix, segmentation_scores

    data = write_seg_data(tmp_path / "seg", {"train": 8, "val": 5})
    cfg = TrainConfig.for_task("segment", data=str(data), model="unet", model_kwargs={"backbone": "vgg11", "width": 0.25},
                               weights=None, img_size=64, epochs=1, max_steps=3, batch_size=4, workers=0,
                               precision="fp32", project=str(tmp_path / "runs"), name="s", plots=False, progress=False)
    weights = fit(cfg, log=lambda *a: None).run_dir / "weights" / "best.pt"
    assert main(["val", "--weights", str(weights), "--save-masks", "--precision", "fp32", "--workers", "0",
                 "--out", str(tmp_path / "val"), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "5 predicted masks at 64x64" in out and str(tmp_path / "val" / "masks") in out
    miou = float(next(line.split()[1] for line in out.splitlines() if line.split()[:1] == ["mIoU"]))

    t = load_trained(weights, device="cpu", precision="fp32")
    td = t.task.build_data(TrainConfig.from_dict({**t.ckpt["config"], "augment": False}))
    cm = torch.zeros(3, 3, dtype=torch.int64)
    for i, (image_path, _) in enumerate(td.val.pairs):
        with Image.open(tmp_path / "val" / "masks" / f"{Path(image_path).stem}.png") as png:
            saved = torch.from_numpy(np.array(png).astype(np.int64))
        image, truth = td.val[i]
        with torch.no_grad():
            expected = t.model(t.task.prepare(image.as_subclass(torch.Tensor)[None])).argmax(1)[0]
        assert torch.equal(saved, expected), image_path
        cm += confusion_matrix(saved, truth.as_subclass(torch.Tensor), 3, ignore_index=255)
    assert float(segmentation_scores(cm, ["background", "red", "blue"])["mIoU"]) == pytest.approx(miou, abs=1e-4)


def test_mask_png_is_16_bit_above_255_classes(tmp_path):
    from cnnkit.tasks.segment import mask_png

    mask = torch.tensor([[0, 254, 255], [256, 299, 7]])
    mask_png(mask, 300).save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as png:
        assert torch.equal(torch.from_numpy(np.array(png).astype(np.int64)), mask)
    mask_png(mask.clamp(max=254), 255).save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as png:
        assert png.mode == "P" and torch.equal(torch.from_numpy(np.array(png).astype(np.int64)), mask.clamp(max=254))


# ---------------------------------------------------------------- the README's paragraph, as written

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_section() -> tuple[list[str], str]:
    """The `cnnkit ...` lines and the Python block of README's "Evaluate with your own tools"."""
    import re

    section = README.read_text().split("### Evaluate with your own tools", 1)[1].split("\n## ", 1)[0]
    shell = re.findall(r"```sh\n(.*?)```", section, flags=re.S)[0]
    commands = [line.split("  #", 1)[0].strip() for line in shell.splitlines() if line.strip()]
    return commands, re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]


def test_readme_evaluate_with_your_own_tools_runs_as_written(tmp_path, monkeypatch, capsys):
    import shlex

    monkeypatch.chdir(tmp_path)
    write_yolo_data(Path("my_data"), rectangle_scenes(seed=2), {"train": 4, "val": 1})
    trained = train_tiny("my_data/data.yaml", Path("runs"), name="exp")
    assert trained.resolve() == (tmp_path / "runs/detect/exp/weights/best.pt").resolve()
    commands, python = readme_section()
    assert [c.split()[:2] for c in commands] == [["cnnkit", "data"], ["cnnkit", "val"], ["cnnkit", "predict"]]
    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
    out = capsys.readouterr().out
    val_ap = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
              if line.split()[:1] in (["AP"], ["AP50"])}
    assert "runs/detect/exp/val/predictions.json" in out and val_ap["AP50"] > 0
    exec(compile(python, "README.md", "exec"), {})
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if " AP50 " in line]
    assert [p[0] for p in printed] == ["runs/detect/exp/val/predictions.json", "runs/detect/exp/predict/predictions.json"]
    for p in printed:  # val prints 4 decimals
        assert float(p[2]) == pytest.approx(val_ap["AP"], abs=1e-4) and float(p[4]) == pytest.approx(val_ap["AP50"], abs=1e-4)
