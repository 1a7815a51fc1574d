"""Hostile files (issue #8): a checkpoint or weights file whose pickle would run code, and images
that declare a huge size (decompression bombs). Each is refused with a CnnkitError; the code in
the pickle never runs and no pixel buffer of the declared size is ever allocated."""

from __future__ import annotations

import pickle
import re
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from cnnkit.cli import main
from cnnkit.data.images import decode_image, decode_many, read_image_size
from cnnkit.data.formats import read_yolo
from cnnkit.data.segmentation import decode_mask
from cnnkit.engine.checkpoint import load_checkpoint
from cnnkit.errors import CnnkitError, WeightsError
from cnnkit.models import build_model
from cnnkit.models.weights import load_weights, read_weights_file

SRC = Path(__file__).resolve().parents[2] / "src" / "cnnkit"


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears iff the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_files(tmp_path: Path) -> tuple[Path, list[Path]]:
    """The marker path and three files carrying the payload: torch.save's zip format (inside a
    checkpoint-like dict), a legacy plain pickle, and a zip whose data.pkl was swapped."""
    marker = tmp_path / "PWNED"
    zipped = tmp_path / "evil_zip.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "model": {"name": "vgg11"}, "evil": Payload(marker)}, zipped)
    legacy = tmp_path / "evil_legacy.pth"
    legacy.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=2))
    swapped = tmp_path / "evil_swapped.pt"
    torch.save({"w": torch.zeros(1)}, swapped)
    with zipfile.ZipFile(swapped) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = pickle.dumps(Payload(marker), protocol=2)
    with zipfile.ZipFile(swapped, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    assert not marker.exists()
    return marker, [zipped, legacy, swapped]


def test_payload_really_runs_without_weights_only(tmp_path):
    """The control: the crafted files do execute their payload when loaded unsafely, so the tests
    below would see the marker if cnnkit loaded them that way."""
    marker, files = hostile_files(tmp_path)
    pickle.loads(files[1].read_bytes())
    assert marker.exists()


def test_checkpoint_loader_refuses_code_carrying_pickles(tmp_path):
    marker, files = hostile_files(tmp_path)
    for f in files:
        with pytest.raises(WeightsError) as info:
            load_checkpoint(f)
        assert str(f) in str(info.value)
        assert not marker.exists()


def test_weights_loader_refuses_code_carrying_pickles(tmp_path):
    marker, files = hostile_files(tmp_path)
    model = build_model("alexnet", num_classes=3, width=0.25)
    for f in files:
        with pytest.raises(WeightsError, match="refused|cannot read") as info:
            read_weights_file(f)
        assert str(f) in str(info.value)
        with pytest.raises(WeightsError):
            load_weights(model, str(f), log=None)
        assert not marker.exists()


@pytest.mark.parametrize("argv", [
    ["predict", "--weights", "{f}", "{img}"],
    ["val", "--weights", "{f}"],
    ["train", "classify", "--resume", "{f}"],
    ["predict", "--model", "alexnet", "--weights", "{f}", "{img}"],
    ["train", "classify", "--model", "alexnet", "--width", "0.25", "--weights", "{f}", "--epochs", "1"],
])
def test_cli_refuses_hostile_weights_in_one_line(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    marker, files = hostile_files(tmp_path)
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(img)
    for f in files:
        code = main([a.format(f=f, img=img) for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and str(f) in err, err
        assert not marker.exists()


def test_every_torch_load_in_the_package_uses_weights_only():
    """grep: every torch.load / load_state_dict_from_url call in src/ passes weights_only=True."""
    calls = 0
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"(torch\.load|load_state_dict_from_url)\(", text):
            depth, end = 0, m.end() - 1
            for end in range(m.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[m.start():end + 1]
            calls += 1
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "pickle.load(" not in text and "pickle.loads(" not in text, path
    assert calls >= 3  # checkpoint.py, weights.py (file and download): the scan sees them


# ---------------------------------------------------------------- decompression bombs

def bomb_png(w: int, h: int) -> bytes:
    """A valid PNG structure (IHDR, one tiny IDAT, IEND) whose header declares w x h RGB pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("w, h", [(100_000, 100_000), (10_000, 9_000), (2**31 - 1, 1)])
def test_decompression_bomb_is_a_data_error(tmp_path, w, h):
    """Far above Pillow's limit (Pillow raises DecompressionBombError), just above it (where Pillow
    only warns and would go on to allocate 270 MB), and a 2**31 x 1 strip: a CnnkitError naming the
    file from every image and mask reader, and a bad entry in decode_many."""
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's limit is kept on
    path = tmp_path / f"bomb {w}.png"
    path.write_bytes(bomb_png(w, h))
    assert path.stat().st_size < 200
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for fn in (decode_image, read_image_size, lambda p: decode_mask(p, 10)):
            with pytest.raises(CnnkitError, match="decompression-bomb|exceeds limit") as info:
                fn(path)
            assert str(path) in str(info.value)
        result = decode_many([str(path)], progress=False)
    assert result.ok == [False] and "pixels" in result.bad[0][1]


def test_decompression_bomb_in_a_dataset_and_on_the_command_line(tmp_path, capsys):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "images" / "train" / "a.png").write_bytes(bomb_png(30_000, 30_000))
    (tmp_path / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "data.yaml").write_text("train: images/train\nnames: [a]\n")
    with pytest.raises(CnnkitError, match="decompression-bomb|exceeds limit"):
        read_yolo(tmp_path)
    skipped = read_yolo(tmp_path, on_bad_label="skip")
    assert skipped.splits["train"] == [] and "decompression" in skipped.problems[0][2]
    code = main(["train", "detect", "--data", str(tmp_path), "--project", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "decompression" in err, err
    assert not (tmp_path / "runs").exists()
