"""Each task's default model and training settings: what `cnnkit train <task>` and `make demo` use.

`TASK_DEFAULTS[task]` holds the model name, its constructor options, and the `TrainConfig` fields that
differ from TrainConfig's own defaults; `TrainConfig.for_task(task, **changes)` builds the config.
The figures behind each choice are in BENCHMARKS.md.
"""

from __future__ import annotations

TASK_DEFAULTS = {
    "classify": dict(model="vgg11_bn", model_kwargs={"width": 0.5, "pool_size": 1, "dropout": 0.2}, config={}),
    # YOLO's S x S x (5B+C) head on the offline ImageNet EfficientNet-Lite0, AdamW with gradient clipping:
    # measured on the 4,000 built-in scenes (BENCHMARKS.md); the paper's SGD recipe (momentum 0.9, wd 5e-4)
    # reached at best AP50 0.42 against AdamW's 0.68 in the same 16 epochs of the 2,000-scene set; the layers at
    # stride <= 4 stay frozen (ImageNet's edges; 1.4-1.5x faster steps, AP50 unchanged at equal epochs); the
    # input stays x / 255 ("unit"): the weights' own (x - 0.5) / 0.5 gave AP50 0.704 against 0.728 / 0.732
    "detect": dict(model="yolo", model_kwargs={"backbone": "efficientnet_lite0", "width": 0.5},
                   config={"data": "scenes", "img_size": 160, "batch_size": 32, "epochs": 12, "lr": 0.002,
                           "optimizer": "adamw", "weight_decay": 0.05, "clip_grad": 10.0, "warmup_epochs": 0.5,
                           "ema": True, "ema_decay": 0.995, "weights": "imagenet", "freeze_early": 4, "input_norm": "unit"}),
    # U-Net on the offline ImageNet EfficientNet-Lite0, scores at stride 4 upsampled bilinearly (DeepLabv3+'s
    # choice), the stride <= 4 layers frozen, a lighter decoder (128-64-48 channels: 1.5x cheaper steps than
    # 256-128-64), in-batch copy-paste, PSPNet's auxiliary classifier and cross-entropy + soft Dice: each measured
    # on the built-in scenes (BENCHMARKS.md); 8 epochs fit the demo's ten minutes
    "segment": dict(model="unet", model_kwargs={"backbone": "efficientnet_lite0", "width": 1.0, "output_stride": 4,
                                                "decoder_channels": [128, 64, 48, 32, 16], "aux_loss": True},
                    config={"data": "scenes-seg", "img_size": 160, "batch_size": 16, "epochs": 8, "lr": 0.002,
                            "optimizer": "adamw", "weight_decay": 0.05, "clip_grad": 10.0, "warmup_epochs": 1.0,
                            "weights": "imagenet", "freeze_early": 4, "copy_paste": 1.0, "dice_weight": 1.0}),
}
