"""Model architectures, each registered by name: `build_model("vgg16", num_classes=10)`.

Importing this package registers every built-in architecture: AlexNet (Krizhevsky et al. 2012) and
VGG-11/13/16/19 with and without batch normalisation (Simonyan & Zisserman 2015).
"""

import importlib
import pkgutil

from cnnkit.models.registry import build_model, get_entry, list_models, register_model
from cnnkit.models import alexnet, vgg, backbones  # noqa: F401  (importing a module registers its builders)
from cnnkit.models import yolo  # noqa: F401
from cnnkit.models import segmentation  # noqa: F401
from cnnkit.models.alexnet import AlexNet, ConvClassifier
from cnnkit.models.summary import ModelSummary, format_summary, model_info, summarize
from cnnkit.models.vgg import VGG

# every module of this package is imported, and a model module registers its builders when imported:
# a new architecture is one new file here (`@register_model(name, task=...)`)
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["AlexNet", "ConvClassifier", "ModelSummary", "VGG", "build_model", "format_summary",
           "get_entry", "list_models", "model_info", "register_model", "summarize"]
