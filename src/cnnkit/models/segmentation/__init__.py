"""Semantic segmentation networks: a class score for every pixel.

Models (all registered with task "segment"):

==========  ==========================================================================================
name        network
==========  ==========================================================================================
deconvnet   Noh, Hong & Han, "Learning Deconvolution Network for Semantic Segmentation", ICCV 2015:
            a VGG-16 encoder, fc6/fc7 as convolutions, then a mirrored decoder of max-unpooling
            (with the encoder's own switches) and transposed convolutions. `DeconvNet`.
fcn32s      Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic Segmentation",
fcn16s      CVPR 2015: VGG-16 with its fully connected layers turned into convolutions, a 1x1 class
fcn8s       score, and learnable transposed convolutions initialised to bilinear interpolation; the
            16s and 8s nets fuse scores of pool4 (and pool3) on the way up ("skip" architecture,
            Section 4.2). `FCN`.
unet        Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image
            Segmentation", MICCAI 2015: a contracting path (any registered backbone) and an expanding
            path that upsamples, concatenates the encoder map of the same stride and applies two 3x3
            convolutions, with the upsampling the chapter compares as an option (transposed
            convolution, nearest or bilinear interpolation). `UNet`.
==========  ==========================================================================================

Every model returns logits `[N, num_classes, H, W]` with exactly the input's H and W, for any size of
at least `min_input_size` (odd sizes too): each upsampling step is sized to the map it is fused with
(the skip, or finally the image), never by padding the input. A smaller input raises `ShapeError`.

Shared options: `num_classes` (21: PASCAL VOC's 20 classes and background), `in_channels`, `img_size`
(the default input size, recorded for summaries and training), `width` (multiplies the decoder / head
channels, and for the cnnkit encoders, AlexNet and VGG, their channels too: a thin encoder cannot take
ImageNet weights) and `backbone`. Attributes: `num_classes`, `in_channels`, `img_size`,
`min_input_size`, `backbone` (a `cnnkit.models.backbones.Backbone`), `backbone_name`.

Transfer learning: `build_model("unet", backbone="efficientnet_lite0", weights="imagenet")` loads the
ImageNet weights into `model.backbone` (`cnnkit.models.weights.load_weights`); the decoder keeps its
initialisation: He-normal convolutions, BatchNorm 1 / 0, FCN's upsamplers bilinear and its class
scores zero (Section 4.2 of the FCN paper).

One file per network, like segmentation_models_pytorch's decoders: `deconvnet.py`, `fcn.py`
(with the bilinear upsampling layer), `unet.py`, and `common.py` for what they share. Importing this
package registers all five models; every name is importable from here.
"""

from cnnkit.models.segmentation.common import (SegmentationNet, conv_bn_relu, init_decoder, max_pool_chain,
                                               spatial_size)
from cnnkit.models.segmentation.deconvnet import DeconvNet, TransposedConvBNReLU, deconvnet
from cnnkit.models.segmentation.fcn import (FCN, FCN_STRIDES, bilinear_kernel, bilinear_upsampling, fcn8s, fcn16s,
                                            fcn32s, init_bilinear_)
from cnnkit.models.segmentation.unet import (UNET_DECODER_CHANNELS, UPSAMPLE_KINDS, Interpolate, UNet, UpBlock,
                                             unet)

__all__ = ["DeconvNet", "FCN", "FCN_STRIDES", "Interpolate", "SegmentationNet", "TransposedConvBNReLU",
           "UNET_DECODER_CHANNELS", "UNet", "UPSAMPLE_KINDS", "UpBlock", "bilinear_kernel", "bilinear_upsampling",
           "conv_bn_relu", "deconvnet", "fcn8s", "fcn16s", "fcn32s", "init_bilinear_", "init_decoder",
           "max_pool_chain", "spatial_size", "unet"]
