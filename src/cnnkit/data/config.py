"""Data YAML files as ultralytics writes them, read with line numbers for every error.

    path: ../datasets/flowers   # root; relative to this file's folder; default: this file's folder
    train: train                # folder relative to `path` (or absolute)
    val: val
    test: test                  # optional; checked, not loaded
    names: [daisy, rose]        # or {0: daisy, 1: rose}; optional for classification
    nc: 2                       # optional; must agree with names

A folder that does not exist, a malformed value or malformed YAML raises DataError naming the
file and the line (from the nodes `yaml.compose` returns). `train`, `val` and `test` must stay
inside the root (`path`): a value such as ../../etc or an absolute path elsewhere is refused
(`resolve_inside`), so a downloaded dataset file cannot make cnnkit read files outside it.
Every top-level value is kept in `DataYaml.values` with its line in `DataYaml.lines`, so a task can
read keys of its own (segmentation: `train_masks`, `val_masks`, `ignore_index`) with the same errors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from cnnkit.errors import DataError

FOLDER_KEYS = ("train", "val", "test")


@dataclass
class DataYaml:
    """A data YAML resolved to absolute folders; `lines` maps each top-level key to its 1-based line."""

    file: Path
    root: Path
    train: Path | None = None
    val: Path | None = None
    test: Path | None = None
    names: list[str] | None = None
    lines: dict[str, int] = field(default_factory=dict)
    values: dict = field(default_factory=dict)  # every top-level key as parsed, for task-specific keys

    def error_at(self, key: str | None) -> Callable[..., DataError]:
        """A factory of DataErrors that name this file and the line of `key` (no line when absent)."""
        line = self.lines.get(key) if key is not None else None

        def make(message: str, fix: str | None = None) -> DataError:
            return DataError(message, path=str(self.file), line=line, fix=fix)
        return make


OUTSIDE_ROOT = "path outside the dataset"


def expand_user(value: str | os.PathLike) -> Path:
    """`~` expanded where there is such a home folder; otherwise the path as written."""
    try:
        return Path(value).expanduser()
    except RuntimeError:  # "~nosuchuser"
        return Path(value)


def is_dir(path: Path) -> bool:
    """Path.is_dir that answers False for a name the OS refuses (too long, NUL) instead of raising."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def is_file(path: Path) -> bool:
    """Path.is_file that answers False for a name the OS refuses (too long, NUL) instead of raising."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def refuse_filesystem_root(root: Path, error: Callable[..., DataError]) -> None:
    """A dataset root of / would have every reader walk the whole file system: refused."""
    if os.path.dirname(os.path.realpath(root)) == os.path.realpath(root):
        raise error(f"'path' is the file-system root {root}; a dataset cannot span the whole disk",
                    fix="set 'path' to the dataset's own folder")


def list_tree(folder: Path) -> list[Path]:
    """Every file under `folder` (recursively, sorted); an unreadable folder is a DataError."""
    try:
        return sorted(p for p in folder.rglob("*") if p.is_file())
    except OSError as exc:
        raise DataError(f"cannot read folder: {exc.strerror or exc}", path=str(getattr(exc, "filename", None)
                        or folder), fix="make it readable (chmod -R a+rX) or leave it out of the dataset") from None


def resolve_inside(root: str | os.PathLike, value: str | os.PathLike) -> Path | None:
    """`value` (relative to `root`, or absolute) as a normalised path when it lies inside `root`, else None.

    Inside means: lexically (after collapsing `..`) or once symbolic links are resolved, so a dataset
    that reaches its own files through a symlinked root is accepted, and `../x` or `/etc/x` is not."""
    text = os.fspath(value)
    if "\0" in text:
        return None
    base = os.path.normpath(os.fspath(root))
    full = os.path.normpath(os.path.join(base, text))
    if full == base or full.startswith(base.rstrip(os.sep) + os.sep):
        return Path(full)
    real_base, real_full = os.path.realpath(base), os.path.realpath(full)
    if real_full == real_base or real_full.startswith(real_base.rstrip(os.sep) + os.sep):
        return Path(full)
    return None


def _compose(file: Path) -> yaml.Node | None:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError("not a text file (not UTF-8)", path=str(file), fix="save the YAML as UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror or exc}", path=str(file),
                        fix="check the path and its permissions") from None
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(": ".join(p for p in (exc.context, exc.problem) if p).split())
        raise DataError(f"malformed YAML: {what}", path=str(file), line=mark.line + 1 if mark else None,
                        fix="correct the YAML syntax at that line (indent with spaces, quote odd names)") from None
    except yaml.YAMLError as exc:
        raise DataError(f"malformed YAML: {' '.join(str(exc).split())}", path=str(file),
                        fix="correct the YAML syntax") from None


def _construct(node: yaml.Node):
    return yaml.SafeLoader("").construct_document(node)


def _parse_names(value, error) -> list[str]:
    if isinstance(value, (list, tuple)):
        names = [str(v) for v in value]
    elif isinstance(value, dict):
        try:
            keyed = {int(k): str(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise error("'names' keys must be the integers 0..n-1", fix="write names: {0: cat, 1: dog}") from None
        if sorted(keyed) != list(range(len(keyed))):
            raise error(f"'names' keys must be 0..{len(keyed) - 1} without gaps, got {sorted(keyed)}",
                        fix="number the classes 0, 1, 2, ...")
        names = [keyed[i] for i in range(len(keyed))]
    else:
        raise error(f"'names' must be a list or a mapping, got {type(value).__name__}",
                    fix="write names: [cat, dog] or names: {0: cat, 1: dog}")
    if not names:
        raise error("'names' is empty", fix="list the class names, or drop the key to use the folder names")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise error(f"'names' repeats {', '.join(duplicates)}", fix="give every class a different name")
    return names


def read_data_yaml(file: str | Path) -> DataYaml:
    """Parse and check a data YAML; every folder it names must exist."""
    file = Path(file)
    node = _compose(file)
    if not isinstance(node, yaml.MappingNode):
        line = node.start_mark.line + 1 if node is not None else None
        raise DataError("a data YAML must be a mapping of keys (path, train, val, names)", path=str(file),
                        line=line, fix="write one 'key: value' per line")
    lines = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            lines[key_node.value] = key_node.start_mark.line + 1
    try:
        values = _construct(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DataError(f"malformed YAML: {' '.join(str(exc).split())}", path=str(file),
                        line=mark.line + 1 if mark else None,
                        fix="correct the YAML at that line") from None
    cfg = DataYaml(file=file, root=file.parent.resolve(), lines=lines, values=dict(values))

    root_value = values.get("path")
    if root_value is not None:
        if not isinstance(root_value, str) or "\0" in root_value:
            raise cfg.error_at("path")("'path' must be a folder name", fix="write path: <folder>")
        root = expand_user(root_value)
        cfg.root = root if root.is_absolute() else (file.parent / root).resolve()
        refuse_filesystem_root(cfg.root, cfg.error_at("path"))
        if not is_dir(cfg.root):
            raise cfg.error_at("path")(f"'path' folder {cfg.root} does not exist",
                                       fix="correct 'path' (relative paths start at the YAML's folder)")
    for key in FOLDER_KEYS:
        value = values.get(key)
        if value is None:
            continue
        make = cfg.error_at(key)
        if isinstance(value, (list, tuple)):
            raise make(f"'{key}' lists several folders; classification takes one folder per split",
                       fix=f"give one folder: {key}: <folder>")
        if not isinstance(value, str):
            raise make(f"'{key}' must be a folder name, got {value!r}", fix=f"write {key}: <folder>")
        folder = resolve_inside(cfg.root, expand_user(value))
        if folder is None:
            raise make(f"{OUTSIDE_ROOT}: '{key}' {value!r} points outside the dataset root {cfg.root}",
                       fix=f"give a folder inside {cfg.root}, or set 'path' to a folder that holds it")
        if not exists(folder):
            raise make(f"'{key}' folder {folder} does not exist",
                       fix=f"create it or correct '{key}' (relative to 'path' = {cfg.root})")
        if not is_dir(folder):
            raise make(f"'{key}' must be a folder of class subfolders, {folder} is a file",
                       fix=f"point '{key}' at a folder with one subfolder per class")
        setattr(cfg, key, folder)

    if values.get("names") is not None:
        cfg.names = _parse_names(values["names"], cfg.error_at("names"))
    nc = values.get("nc")
    if nc is not None and cfg.names is not None and nc != len(cfg.names):
        raise cfg.error_at("nc")(f"nc is {nc} but 'names' lists {len(cfg.names)} classes",
                                 fix="make nc match names, or drop nc")
    return cfg
