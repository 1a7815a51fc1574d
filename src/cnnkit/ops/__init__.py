"""The chapter's operations, written out as readable reference implementations.

The models are built from torch.nn layers (the fast kernels); these functions say what those layers
compute, and the tests hold the two against each other.
"""

from cnnkit.ops.sizes import (FieldOfView, LayerGeometry, conv_output_size,
                              conv_transpose_output_size, pool_output_size, receptive_field,
                              receptive_fields)
from cnnkit.ops.conv import conv1x1, conv2d
from cnnkit.ops.pool import max_pool2d, mean_pool2d, subsample
from cnnkit.ops.transpose import conv_transpose1d, conv_transpose2d
from cnnkit.ops.upsample import max_unpool2d, upsample_bilinear, upsample_nearest
