"""Pascal VOC XML detection annotations (Everingham et al. 2010, the VOC devkit layout).

    Annotations/x.xml            <annotation><filename>x.jpg</filename><size><width>..<height>..</size>
                                 <object><name>dog</name><difficult>0</difficult>
                                 <bndbox><xmin>..<ymin>..<xmax>..<ymax>..</bndbox></object> ...
    JPEGImages/x.jpg
    ImageSets/Main/train.txt     one image id (file stem) per line; also val.txt, test.txt
    labels.txt                   class names in label order (cnnkit writes it; optional)

Coordinates are 1-based inclusive pixel indices: x1 = xmin - 1, x2 = xmax. Class names come from
labels.txt (or classes.txt) when present, else from the objects' names sorted alphabetically
(which is VOC's own order of its 20 classes). Objects marked difficult are left out and counted in
`notes`, as ultralytics does. With no ImageSets/Main, every XML belongs to "train". An ImageSets
list with only trainval.txt gives "train". Errors name the XML file and the line of the element.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from cnnkit.data.config import OUTSIDE_ROOT, is_file, resolve_inside
from cnnkit.data.formats.common import (DetectionFormat, register_format, IMAGE_NOT_FOUND, LABEL_WITHOUT_IMAGE, MALFORMED_XML, MISSING_KEY,
                                        UNKNOWN_CLASS, UNREADABLE_IMAGE, DetectionRecord, DetectionSplits, Problems,
                                        check_box, check_splits, image_sizes, place_image, staging_dir, unique_names)
from cnnkit.data.images import IMAGE_EXTENSIONS
from cnnkit.errors import DataError

XML_FIX = "correct the XML (VOC boxes are 1-based pixel indices xmin <= xmax, ymin <= ymax)"


@dataclass
class XmlNode:
    """An XML element with the 1-based line where it starts."""

    tag: str
    line: int
    children: list[XmlNode] = field(default_factory=list)
    text: str = ""

    def find(self, tag: str) -> XmlNode | None:
        return next((c for c in self.children if c.tag == tag), None)

    def findall(self, tag: str) -> list[XmlNode]:
        return [c for c in self.children if c.tag == tag]


def parse_xml(data: bytes) -> XmlNode:
    """Parse with expat, keeping line numbers; raises expat.ExpatError (.lineno) on bad XML."""
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    stack: list[tuple[XmlNode, list[str]]] = []
    roots: list[XmlNode] = []

    def start(tag, _attrs):
        node = XmlNode(tag, parser.CurrentLineNumber)
        (stack[-1][0].children if stack else roots).append(node)
        stack.append((node, []))

    def end(_tag):
        node, parts = stack.pop()
        node.text = "".join(parts).strip()

    def chars(text):
        if stack:
            stack[-1][1].append(text)

    parser.StartElementHandler, parser.EndElementHandler, parser.CharacterDataHandler = start, end, chars
    parser.Parse(data, True)
    return roots[0]


def _read_text(file: Path, what: str) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read: {' '.join(str(exc).split())}", path=str(file),
                        fix=f"save it as UTF-8 text, {what}") from None


def _names_file(root: Path) -> list[str] | None:
    for name in ("labels.txt", "classes.txt"):
        f = root / name
        if f.is_file():
            names = [line.strip() for line in _read_text(f, "one class name a line").splitlines() if line.strip()]
            if names:
                return names
    return None


def _split_ids(root: Path) -> dict[str, list[str]]:
    main = root / "ImageSets" / "Main"
    lists = {s: main / f"{s}.txt" for s in ("train", "val", "test")}
    found = {s: f for s, f in lists.items() if f.is_file()}
    if not found and (main / "trainval.txt").is_file():
        found = {"train": main / "trainval.txt"}
    if not found:
        return {"train": sorted(p.stem for p in (root / "Annotations").glob("*.xml"))}
    out = {}
    for split, f in found.items():
        out[split] = [line.split()[0] for line in _read_text(f, "one image id a line").splitlines() if line.strip()]
    return out


def _image_path(root: Path, image_id: str, filename: str) -> Path | None:
    folder = root / "JPEGImages"
    if filename and resolve_inside(folder, filename) is not None and is_file(folder / filename):
        return folder / filename
    for ext in sorted(IMAGE_EXTENSIONS):
        for e in (ext, ext.upper()):
            if is_file(folder / f"{image_id}{e}"):
                return folder / f"{image_id}{e}"
    return None


def _number(node: XmlNode | None) -> float | None:
    if node is None:
        return None
    try:
        return float(node.text)
    except ValueError:
        return None


@dataclass
class _Parsed:
    xml: Path
    image_id: str
    filename: str
    size: tuple[int, int] | None
    objects: list[tuple[str, tuple[float, float, float, float], int]]  # name, raw VOC box, line
    difficult: int = 0


def _parse_annotation(xml: Path, image_id: str, problems: Problems) -> _Parsed | None:
    try:
        tree = parse_xml(xml.read_bytes())
    except expat.ExpatError as exc:
        problems.report(MALFORMED_XML, expat.ErrorString(exc.code), xml, exc.lineno, fix="repair the XML")
        return None
    except OSError as exc:
        problems.report(MALFORMED_XML, f"cannot read: {exc}", xml, fix="check the file")
        return None
    if tree.tag != "annotation":
        problems.report(MALFORMED_XML, f"root element is <{tree.tag}>, expected <annotation>", xml, tree.line,
                        fix="use a Pascal VOC annotation file")
        return None
    filename = tree.find("filename").text if tree.find("filename") is not None else ""
    size = None
    size_node = tree.find("size")
    if size_node is not None:
        w, h = _number(size_node.find("width")), _number(size_node.find("height"))
        if w is not None and h is not None and w > 0 and h > 0 and w.is_integer() and h.is_integer():
            size = (int(w), int(h))
    parsed = _Parsed(xml, image_id, filename, size, [])
    for obj in tree.findall("object"):
        name_node = obj.find("name")
        if name_node is None or not name_node.text:
            problems.report(MISSING_KEY, "<object> without <name>", xml, obj.line, fix=XML_FIX)
            continue
        difficult = _number(obj.find("difficult"))
        if difficult:
            parsed.difficult += 1
            continue
        box_node = obj.find("bndbox")
        if box_node is None:
            problems.report(MISSING_KEY, f"<object> {name_node.text!r} without <bndbox>", xml, obj.line, fix=XML_FIX)
            continue
        values = []
        for key in ("xmin", "ymin", "xmax", "ymax"):
            v = _number(box_node.find(key))
            if v is None:
                node = box_node.find(key)
                what = "missing" if node is None else f"not a number ({node.text!r})"
                problems.report(MISSING_KEY, f"<{key}> of object {name_node.text!r} is {what}", xml,
                                node.line if node is not None else box_node.line, fix=XML_FIX)
                break
            values.append(v)
        else:
            parsed.objects.append((name_node.text, tuple(values), box_node.line))
    return parsed


def read_voc(src: str | os.PathLike, *, on_bad_label: str = "error",
             names: list[str] | None = None) -> DetectionSplits:
    """Read a VOC folder (Annotations/, JPEGImages/, ImageSets/Main/); `names` fixes the class order."""
    problems = Problems(on_bad_label)
    root = Path(src).expanduser()
    if not (root / "Annotations").is_dir():
        raise DataError("no Annotations/ folder: not a Pascal VOC dataset", path=str(root),
                        fix="point at the folder that holds Annotations/ and JPEGImages/")
    root = root.resolve()
    parsed_splits: dict[str, list[_Parsed]] = {}
    for split, ids in _split_ids(root).items():
        parsed_splits[split] = []
        for image_id in ids:
            xml = root / "Annotations" / f"{image_id}.xml"
            if resolve_inside(root / "Annotations", f"{image_id}.xml") is None:
                problems.report(OUTSIDE_ROOT, f"id {image_id!r} of ImageSets/Main/{split}.txt points outside "
                                "Annotations/", root / "ImageSets" / "Main" / f"{split}.txt",
                                fix="list plain image ids (file stems), one a line")
                continue
            if not is_file(xml):
                problems.report(IMAGE_NOT_FOUND, f"id {image_id!r} of ImageSets/Main/{split}.txt has no "
                                f"Annotations/{image_id}.xml", root / "ImageSets" / "Main" / f"{split}.txt",
                                fix="add the annotation or remove the id")
                continue
            parsed = _parse_annotation(xml, image_id, problems)
            if parsed is not None:
                parsed_splits[split].append(parsed)

    names = list(names) if names is not None else _names_file(root)
    if names is None:
        names = sorted({obj[0] for recs in parsed_splits.values() for p in recs for obj in p.objects})
    if not names:
        raise DataError("no class names: no labels.txt and no <object> with a <name> in any annotation",
                        path=str(root), fix="add labels.txt (one class name a line) or annotate some objects")
    label_of = {n: i for i, n in enumerate(names)}
    splits: dict[str, list[DetectionRecord]] = {}
    difficult = 0
    for split, parsed_list in parsed_splits.items():
        paths = [_image_path(root, p.image_id, p.filename) for p in parsed_list]
        sizes = iter(image_sizes([str(q) for p, q in zip(parsed_list, paths) if q is not None and p.size is None]))
        records = []
        for p, image in zip(parsed_list, paths):
            if p.filename and resolve_inside(root / "JPEGImages", p.filename) is None:
                problems.report(OUTSIDE_ROOT, f"<filename> {p.filename!r} points outside JPEGImages/", p.xml,
                                fix="give the image's file name only")
                continue
            if image is None:
                problems.report(LABEL_WITHOUT_IMAGE, f"no JPEGImages/{p.filename or p.image_id + '.*'}", p.xml,
                                fix="add the image, or delete the annotation file")
                continue
            size = p.size
            if size is None:
                size, reason = next(sizes)
                if size is None:
                    problems.report(UNREADABLE_IMAGE, reason, image, fix="replace or delete the image")
                    continue
            w, h = size
            boxes, labels = [], []
            for name, (xmin, ymin, xmax, ymax), line in p.objects:
                if name not in label_of:
                    problems.report(UNKNOWN_CLASS, f"{name!r} is not in labels.txt ({', '.join(names)})", p.xml, line,
                                    fix="correct the name or add it to labels.txt")
                    continue
                box, kind, detail = check_box(xmin - 1, ymin - 1, xmax, ymax, w, h)
                if box is None:
                    problems.report(kind, f"VOC box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}): {detail}", p.xml, line,
                                    fix=XML_FIX)
                    continue
                boxes.append(box)
                labels.append(label_of[name])
            difficult += p.difficult
            records.append(DetectionRecord(image, w, h, boxes, labels))
        splits[split] = records
    notes = [f"{difficult} objects marked difficult left out"] if difficult else []
    return DetectionSplits(names=names, splits=splits, problems=problems.items, notes=notes, format="voc", root=root)


# ---------------------------------------------------------------- writing

def _px(v: float) -> str:
    """A coordinate with at most 4 decimals, an integer without any."""
    text = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def annotation_xml(rec: DetectionRecord, names: list[str], filename: str) -> str:
    """One record as a VOC annotation (xmin = x1 + 1, xmax = x2)."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "JPEGImages"
    ET.SubElement(ann, "filename").text = filename
    size = ET.SubElement(ann, "size")
    for key, value in (("width", rec.width), ("height", rec.height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(ann, "segmented").text = "0"
    for (x1, y1, x2, y2), c in zip(rec.boxes.tolist(), rec.labels.tolist()):
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = names[c]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for key, v in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, key).text = _px(v)
    ET.indent(ann)
    return ET.tostring(ann, encoding="unicode") + "\n"


def _without_spaces(names: list[str]) -> list[str]:
    """ImageSets lists hold one id a line, split at white space: white space in a name becomes '_'
    (a number is added where that makes two names equal, case-insensitively)."""
    out, taken = [], {n.lower() for n in names if not any(c.isspace() for c in n)}
    for name in names:
        if any(c.isspace() for c in name):
            stem, ext = os.path.splitext("".join("_" if c.isspace() else c for c in name))
            candidate, k = stem + ext, 1
            while candidate.lower() in taken:
                candidate, k = f"{stem}_{k}{ext}", k + 1
            taken.add(candidate.lower())
            name = candidate
        out.append(name)
    return out


def write_voc(splits: DetectionSplits, dst: str | os.PathLike, *, link: bool = True) -> Path:
    """Write Annotations/, JPEGImages/, ImageSets/Main/<split>.txt and labels.txt into `dst` (new or
    empty), atomically as a whole; image ids are unique across splits. Returns `dst`."""
    check_splits(splits)
    dst = Path(dst).expanduser()
    with staging_dir(dst) as tmp:
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (tmp / sub).mkdir(parents=True)
        pairs = [(split, rec) for split, recs in splits.splits.items() for rec in recs]
        file_names = _without_spaces(unique_names(pairs))
        ids: dict[str, list[str]] = {split: [] for split in splits.splits}
        for (split, rec), name in zip(pairs, file_names):
            stem = os.path.splitext(name)[0]
            place_image(rec.image_path, tmp / "JPEGImages" / name, link)
            (tmp / "Annotations" / f"{stem}.xml").write_text(annotation_xml(rec, splits.names, name), encoding="utf-8")
            ids[split].append(stem)
        for split, stems in ids.items():
            (tmp / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems), encoding="utf-8")
        (tmp / "labels.txt").write_text("".join(f"{n}\n" for n in splits.names), encoding="utf-8")
    return dst


def _is_voc_folder(path: Path) -> bool:
    return (path / "Annotations").is_dir() and ((path / "JPEGImages").is_dir() or (path / "ImageSets").is_dir())


register_format(DetectionFormat("voc", read_voc, write_voc, is_dataset_folder=_is_voc_folder, priority=10,
                                looked_for="no Annotations/ + JPEGImages/ (Pascal VOC)"))
