"""Dataset readers. Classification: `load_classification_data(spec)` -> `ClassificationData`."""

from cnnkit.data.classification import (ClassificationData, ImageFileDataset, TensorImageDataset,
                                        load_classification_data, stratified_split)

__all__ = ["ClassificationData", "ImageFileDataset", "TensorImageDataset", "load_classification_data",
           "stratified_split"]
