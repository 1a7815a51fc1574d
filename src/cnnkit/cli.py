"""The `cnnkit` command: parses arguments, then calls the library. No logic of its own."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from cnnkit.errors import CnnkitError, UsageError
from cnnkit.taskapi import (COUNT, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, PROBABILITY, number,  # noqa: F401
                            all_defaults, flag_dest, flag_name, task_class, task_names)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake on one line and exits 2."""

    def error(self, message: str):  # noqa: D102
        raise UsageError(f"{self.prog}: {message}", fix=f"see `{self.prog} --help`")


class _HelpFormatter(argparse.HelpFormatter):
    """Prints every option's default, including those without help text."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is not argparse.SUPPRESS and action.option_strings and "(default" not in text \
                and not isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction)):
            text += " (default: %(default)s)"
        return text


def _fmt():
    return lambda prog: _HelpFormatter(prog, max_help_position=32)


_number = number  # argparse value types: cnnkit.taskapi (the tasks' options use them too)
IMG_SIZE = number(int, 1, 8192)


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """'3x224x224' -> (3, 224, 224); '224' -> (3, 224, 224); '1x28x28' -> (1, 28, 28)."""
    m = re.fullmatch(r"\s*(?:(\d+)\s*[xX,]\s*)?(\d+)(?:\s*[xX,]\s*(\d+))?\s*", text)
    if not m or (m.group(1) and not m.group(3)):
        raise UsageError(f"malformed --input {text!r}", fix="write it as CxHxW, e.g. --input 3x224x224")
    if m.group(3):
        c, h, w = int(m.group(1) or 3), int(m.group(2)), int(m.group(3))
    else:
        c, h, w = 3, int(m.group(2)), int(m.group(2))
    if min(c, h, w) < 1:
        raise UsageError(f"--input {text!r} has a zero size", fix="every size must be at least 1")
    return c, h, w


MODEL_FLAGS = ("width", "pool_size", "dropout", "backbone")  # model options every task's parser offers


def _model_kwargs(args, task=None) -> dict:
    """The model options given on the command line: the common ones and the task's own (`option(model=True)`)."""
    keys = MODEL_FLAGS + (tuple(task_class(task).Options.model_names()) if task else ())
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def cmd_models(args) -> int:
    from cnnkit.models import list_models

    for name in list_models():
        print(name)
    return 0


def cmd_info(args) -> int:
    from cnnkit.models.summary import model_info

    c, h, w = parse_input_shape(args.input)
    kwargs = _model_kwargs(args)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    if c != 3:
        kwargs["in_channels"] = c
    print(model_info(args.model, input_shape=(c, h, w), **kwargs))
    return 0


def _add_train_flags(p: argparse.ArgumentParser, task: str) -> None:
    """`cnnkit train TASK`'s flags: the engine's (model, data, schedule, run) and the task's own options."""
    defaults = _task_defaults(task)
    _add_model_data_flags(p, defaults)
    _add_optim_flags(p, defaults)
    _add_run_flags(p, defaults)
    _add_task_flags(p, task, defaults)


def _task_defaults(task: str):
    from cnnkit.engine.config import TrainConfig

    return TrainConfig.for_task(task)


def _add_model_data_flags(p: argparse.ArgumentParser, defaults) -> None:
    own = task_class(defaults.task).defaults.get("model_kwargs", {})

    def of_default(key: str) -> str:  # "; 0.25 for the classify default" where the task's default model sets it
        return f"; {own[key]:g} for the {defaults.task} default" if key in own else ""

    width = f", width {own['width']:g}" if "width" in own else ""
    p.add_argument("--model", default=None, help=f"registered model name, see `cnnkit models` (default: {defaults.model}{width})")
    p.add_argument("--data", default=defaults.data, help="built-in name, image folder, or data YAML")
    p.add_argument("--epochs", type=POSITIVE_INT, default=defaults.epochs, help="passes over the training data")
    p.add_argument("--time", type=POSITIVE, default=None, metavar="MINUTES",
                   help="train to a time budget: the run times its first steps, sets the epochs so that training, "
                   "evaluation, pictures and report end inside it (the last epoch may be partial), and fits the lr "
                   "schedule to them (with --epochs: whichever ends first; a resumed run keeps what is left)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=defaults.batch_size, help="images per optimizer step; "
                   "under torchrun the global batch, split evenly over the processes")
    p.add_argument("--img-size", type=IMG_SIZE, default=defaults.img_size, help="input height = width")
    p.add_argument("--width", type=POSITIVE, default=None, help=f"channel width multiplier (default: the model's own{of_default('width')})")
    p.add_argument("--pool-size", type=POSITIVE_INT, default=None, help=f"adaptive pool size before the classifier (default: the model's own{of_default('pool_size')})")
    p.add_argument("--dropout", type=PROBABILITY, default=None, help=f"classifier dropout (default: the model's own{of_default('dropout')})")
    p.add_argument("--backbone", default=None, help="yolo / unet: the registry backbone under the head (default: the model's own)")
    p.add_argument("--weights", default=None, help=f"(default: {defaults.weights or 'none'} with the default model, "
                   "else none) initial weights: none, imagenet (offline where available, see "
                   "`cnnkit weights list`), a torchvision weight name such as VGG16_Weights.IMAGENET1K_V1, or a "
                   ".pt/.pth/.safetensors file; none = random initialisation")
    p.add_argument("--download", action="store_true", help="allow downloading torchvision weights into TORCH_HOME")
    p.add_argument("--input-norm", choices=("weights", "unit"), default=defaults.input_norm,
                   help="input scaling with pretrained weights: weights = their own mean / std (EfficientNet-Lite0: "
                   "(x - 0.5) / 0.5), unit = x / 255 in [0, 1] (the detect default, measured better there)")
    p.add_argument("--freeze-backbone", action="store_true", help="train only the head; the backbone's BatchNorm stays in eval mode")
    p.add_argument("--unfreeze-at", type=COUNT, default=defaults.unfreeze_at, help="1-based epoch at which a frozen backbone starts training (0 = never)")
    p.add_argument("--freeze-early", type=int, choices=(0, 2, 4, 8, 16), default=defaults.freeze_early,
                   metavar="STRIDE", help="keep the backbone layers that run at stride <= STRIDE frozen for the "
                   "whole run (ImageNet's low-level features; no backward through the high-resolution layers, so "
                   "faster); 0 = train every layer")
    p.add_argument("--backbone-lr-scale", type=NON_NEGATIVE, default=defaults.backbone_lr_scale, help="backbone learning rate = lr x this")


def _add_optim_flags(p: argparse.ArgumentParser, defaults) -> None:
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=defaults.optimizer, help="optimizer")
    p.add_argument("--lr", type=POSITIVE, default=defaults.lr, help="peak learning rate (after warm-up)")
    p.add_argument("--momentum", type=FRACTION, default=defaults.momentum, help="SGD momentum (AdamW beta1)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=defaults.weight_decay, help="L2 penalty, not on biases and norms")
    p.add_argument("--schedule", choices=("cosine", "step", "constant"), default=defaults.schedule, help="learning-rate schedule after warm-up")
    p.add_argument("--warmup-epochs", type=NON_NEGATIVE, default=defaults.warmup_epochs, help="linear warm-up length")
    p.add_argument("--steps", type=POSITIVE_INT, nargs="*", default=[], help="epochs at which --schedule step multiplies the lr by gamma (default: about 55%% and 80%% of --epochs)")
    p.add_argument("--gamma", type=POSITIVE, default=defaults.gamma, help="step schedule factor")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=defaults.ema,
                   help="evaluate and save an exponential moving average of the weights")
    p.add_argument("--ema-decay", type=FRACTION, default=defaults.ema_decay, help="EMA decay per step")
    p.add_argument("--clip-grad", type=NON_NEGATIVE, default=defaults.clip_grad, help="max gradient norm (0 = off)")
    p.add_argument("--skip-nonfinite", action="store_true", help="skip a step whose loss is NaN or infinite (no "
                   "weight, optimizer or EMA update; the lr schedule moves on) and count it in metrics.csv "
                   "(skipped_steps), instead of stopping the run")
    p.add_argument("--no-augment", action="store_true", help="train without data augmentation")


def _add_run_flags(p: argparse.ArgumentParser, defaults) -> None:
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=defaults.precision, help="auto: measured on this CPU, model and batch (bf16 when it is at least 1.1x faster than fp32); on CUDA bf16 (fp16 where bf16 is missing)")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default=defaults.channels_last, help="memory format (auto: measured on this CPU, model and batch, on when at least 1.05x faster; always on with CUDA)")
    p.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--workers", type=number(int, -1), default=defaults.workers, help="DataLoader workers (-1 = automatic)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    p.add_argument("--project", default=defaults.project, help="folder that holds the runs")
    p.add_argument("--name", default=defaults.name, help="run name: runs/<task>/<name> (numbered when it exists)")
    p.add_argument("--exist-ok", action="store_true", help="reuse runs/<task>/<name> instead of numbering a new one")
    p.add_argument("--resume", default=None, metavar="LAST_PT", help="continue the run of this last.pt exactly where it stopped")
    p.add_argument("--max-steps", type=COUNT, default=0, help="stop after this many optimizer steps (0 = no limit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training model (inductor): "
                   "on the 2-core CPU of BENCHMARKS.md it trained the detector slower (103 against 123 img/s, "
                   "after 41 s of compilation); try it on a GPU")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on GPUs: BatchNorm statistics over the "
                   "global batch (nn.SyncBatchNorm; torch supports it on CUDA only)")


def _add_task_flags(p: argparse.ArgumentParser, task: str, defaults) -> None:
    """The task's own options (`Task.Options`), each with its flag, type and help; defaults are the task's."""
    for f in task_class(task).Options.flags():
        m = f.metadata
        default = None if m.get("model") else getattr(defaults.options, f.name)
        kwargs: dict = {"default": default, "help": m.get("help", "")}
        if m.get("type") is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update({k: m[k] for k in ("type", "choices", "metavar") if m.get(k) is not None})
        p.add_argument(flag_name(f), dest=f.name, **kwargs)


def task_flags(task: str) -> list[str]:
    """The flags of a task's own options."""
    return [flag_name(f) for f in task_class(task).Options.flags()]


# Per task: the default model and the training settings that differ from TrainConfig's (`Task.defaults`).
def __getattr__(name: str):
    if name == "TASK_DEFAULTS":  # read from the registry when asked for
        return all_defaults()
    raise AttributeError(name)


ENGINE_SETTINGS = ("data", "batch_size", "img_size", "optimizer", "lr", "momentum", "weight_decay", "schedule",
                   "warmup_epochs", "gamma", "ema", "ema_decay", "clip_grad", "skip_nonfinite", "precision",
                   "channels_last", "device", "workers", "seed", "project", "name", "exist_ok", "input_norm",
                   "max_steps", "download", "freeze_backbone", "unfreeze_at", "freeze_early", "compile",
                   "backbone_lr_scale", "sync_bn")


def config_from_args(task: str, args):
    """The TrainConfig of `cnnkit train TASK ...`, built as `TrainConfig.for_task` builds it (`fit` refuses a
    model of another task before it reads any data)."""
    from cnnkit.engine.config import TrainConfig

    d = task_class(task).defaults
    explicit_model = args.model is not None
    model = args.model or d["model"]
    kwargs = dict(d.get("model_kwargs", {})) if not explicit_model else {}
    kwargs.update(_model_kwargs(args, task))
    weights = args.weights if args.weights is not None else (None if explicit_model else d["config"].get("weights"))
    if weights is not None and weights.lower() == "none":
        weights = None
    # --time alone: as many epochs as the budget allows (epochs 0); with --epochs, whichever ends first
    epochs = 0 if args.time and not getattr(args, "epochs_given", True) else args.epochs
    changes = {k: getattr(args, k) for k in ENGINE_SETTINGS}
    changes.update(model=model, model_kwargs=kwargs, epochs=epochs, time=args.time or 0.0, steps=list(args.steps),
                   augment=not args.no_augment, weights=weights,
                   progress=not args.no_progress and sys.stderr.isatty())
    options = {n: getattr(args, n) for n in task_class(task).Options.setting_names()}
    return TrainConfig.for_task(task, **changes, **options), explicit_model


def cmd_train(args) -> int:
    from cnnkit.engine.distributed import is_main
    from cnnkit.engine.loop import TrainingInterrupted
    from cnnkit.engine.trainer import fit

    cfg, explicit = config_from_args(args.task, args)
    try:
        result = fit(cfg, resume=args.resume, explicit_model=explicit,
                     extend_epochs=args.epochs if args.resume and args.epochs_given else None)
    except TrainingInterrupted as exc:  # SIGINT / SIGTERM: a checkpoint was saved; 130 / 143 as a shell reports it
        if is_main():
            print(f"cnnkit: {exc}", file=sys.stderr)
        return exc.exit_code
    if is_main():  # under torchrun only rank 0 speaks
        print(f"results in {result.run_dir} (best {cfg.task} fitness {result.best_fitness:.4f})")
    return 0


def cmd_val(args) -> int:
    from cnnkit.engine.inference import validate

    out = Path(args.out) if args.out else Path(args.weights).resolve().parent.parent / "val"
    save = tuple(k for k in _save_kinds() if getattr(args, f"save_{k}", False))
    m = validate(args.weights, data=args.data, batch_size=args.batch_size, device=args.device,
                 precision=args.precision, channels_last=args.channels_last, workers=args.workers, out_dir=out,
                 save=save, fold_bn=args.fold_bn)
    _print_metrics(m)
    print(f"pictures in {out}")
    return 0


def _print_metrics(m: dict) -> None:
    for k, v in m.items():
        if isinstance(v, float):
            print(f"{k:>12s}  {v:.4f}")
        elif isinstance(v, int):
            print(f"{k:>12s}  {v}")
    if "per_class" in m:
        print("per-class accuracy:")
        for name, acc in m["per_class"].items():
            print(f"  {name:<20s} {acc:.4f}")


def cmd_predict(args) -> int:
    from cnnkit.engine.inference import load_pretrained, load_trained
    from cnnkit.engine.predictor import predict_files

    if args.model:
        t = load_pretrained(args.model, args.weights, download=args.download, device=args.device,
                            precision=args.precision, fold_bn=args.fold_bn)
    else:
        t = load_trained(args.weights, device=args.device, precision=args.precision,
                         channels_last=args.channels_last, batch_size=args.batch_size, fold_bn=args.fold_bn, log=print)
    out = Path(args.out) if args.out else Path("runs") / t.task.name / "predict"
    given = {}
    for flag, owners in _predict_flags().items():
        value = getattr(args, flag_dest(flag))
        if value is None:
            continue
        if t.task.name not in owners:
            raise UsageError(f"{flag} applies to {'/'.join(owners)} checkpoints only, not {t.task.name}",
                             fix=f"drop {flag}")
        given[flag_dest(flag)] = value
    rows = predict_files(t, args.sources, out_dir=out, batch_size=args.batch_size, options=given)
    for r in rows[: args.show]:
        print(r["summary"])
    if len(rows) > args.show:
        print(f"... {len(rows) - args.show} more")
    print(f"{len(rows)} image(s); results in {out}")
    return 0


def _predict_flags() -> dict[str, list[str]]:
    """Every task's `cnnkit predict` flags: {flag: the tasks that take it}."""
    owners: dict[str, list[str]] = {}
    for name in task_names():
        for flag in task_class(name).predict_flags:
            owners.setdefault(flag, []).append(name)
    return owners


def _save_kinds() -> dict[str, str]:
    """Every task's `cnnkit val --save-KIND`: {KIND: help}."""
    kinds: dict[str, str] = {}
    for name in task_names():
        for kind, what in task_class(name).saves.items():
            kinds.setdefault(kind, f"{name}: write OUT/{what}")
    return kinds


def cmd_export(args) -> int:
    from cnnkit.engine.export import export

    from cnnkit.engine.export import ExportSettings

    r = export(args.weights, ExportSettings(format=args.format, out=args.out, img_size=args.img_size, opset=args.opset,
                                            batch_size=args.batch_size, with_nms=args.with_nms,
                                            conf_threshold=args.conf_threshold, iou_threshold=args.iou_threshold,
                                            max_det=args.max_det, check=args.check))
    for label, diff in r.checks:
        print(f"checked against PyTorch: {label}: max abs difference {diff:.2e}")
    print(f"{r.metadata['task']} model exported to {r.path} ({r.format}; outputs: {'; '.join(r.metadata['outputs'])})")
    return 0


def cmd_data_check(args) -> int:
    from cnnkit.data.check import check_dataset

    report = check_dataset(args.data, args.task, decode=not args.fast)
    print(report.format())
    return report.exit_code


def cmd_data_convert(args) -> int:
    from cnnkit.data.convert import convert

    print(convert(args.src, args.dst, to=args.to, on_bad_label=args.on_bad_label))
    return 0


def cmd_data_scenes(args) -> int:
    from cnnkit.data.scenes import generate_scenes

    out = generate_scenes(args.out, n_train=args.n_train, n_val=args.n_val, img_size=args.img_size, seed=args.seed)
    print(f"scenes written to {out}")
    return 0


def cmd_weights_list(args) -> int:
    from cnnkit.models.weights import format_weights_table

    print(format_weights_table())
    return 0


def cmd_report(args) -> int:
    from cnnkit.engine.report import default_report_path, write_report

    out = Path(args.out) if args.out else default_report_path(args.run_dirs)
    print(f"report written to {write_report(args.run_dirs, out, gallery=args.gallery, device=args.device)}")
    return 0


def cmd_explain(args) -> int:
    from cnnkit.explain import explain

    result = explain(args.topic, args.model, out=args.out, seed=args.seed, input_size=args.input,
                     kernel=args.kernel, stride=args.stride, padding=args.padding,
                     output_padding=args.output_padding, activation=args.activation, at=args.at,
                     in_channels=args.in_channels, out_channels=args.out_channels, layer=args.layer)
    print(result.text())
    print(f"picture written to {result.png}")
    return 0


def cmd_demo(args) -> int:
    from cnnkit.demo import demo_tasks, run_demo
    from cnnkit.engine.loop import TrainingInterrupted

    try:
        return run_demo(quick=args.quick, tasks=demo_tasks() if args.task == "all" else (args.task,))
    except TrainingInterrupted as exc:  # Ctrl-C / SIGTERM: the run's checkpoint is saved; no traceback
        print(f"cnnkit: demo {exc}", file=sys.stderr)
        return exc.exit_code


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cnnkit", description="2D convolutional networks: operations, models, training, evaluation.",
                formatter_class=_fmt())
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_models, _add_train, _add_val, _add_predict, _add_export, _add_data, _add_tools, _add_explain):
        add(sub)
    return p


def _add_models(sub) -> None:
    s = sub.add_parser("models", help="list the registered models", formatter_class=_fmt())
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("info", help="layer table: output shapes, parameters, multiply-adds, receptive fields",
                       formatter_class=_fmt())
    s.add_argument("model")
    s.add_argument("--input", default="3x224x224", help="input shape CxHxW")
    s.add_argument("--width", type=POSITIVE, default=None, help="channel width multiplier")
    s.add_argument("--pool-size", type=POSITIVE_INT, default=None, help="adaptive pool size before the classifier")
    s.add_argument("--num-classes", type=POSITIVE_INT, default=None, help="classes (default: the model's own: 1000 for "
                   "classifiers, 20 for YOLO, 21 for segmentation nets)")
    s.set_defaults(func=cmd_info)



def _add_train(sub) -> None:
    s = sub.add_parser("train", help="train a model", formatter_class=_fmt())
    tsub = s.add_subparsers(dest="task", required=True, parser_class=_Parser)
    for task in task_names():
        t = tsub.add_parser(task, help=f"train a {task} model", formatter_class=_fmt())
        _add_train_flags(t, task)
        t.set_defaults(func=cmd_train)


def _add_val(sub) -> None:
    s = sub.add_parser("val", help="evaluate a checkpoint", formatter_class=_fmt())
    s.add_argument("--weights", required=True, help="a best.pt / last.pt written by `cnnkit train`")
    s.add_argument("--data", default=None, help="data to evaluate on (default: the run's own validation split)")
    s.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="images per batch")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    s.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: measured on this CPU and model (bf16 when at least 1.1x faster); bf16 / fp16 on CUDA")
    s.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="memory format (auto: measured on this CPU and model; on with CUDA)")
    _add_fold_bn(s)
    s.add_argument("--workers", type=_number(int, -1), default=-1, help="DataLoader workers (-1 = automatic)")
    s.add_argument("--out", default=None, help="folder for the pictures and saved predictions (default: <run>/val)")
    for kind, what in _save_kinds().items():
        s.add_argument(f"--save-{kind}", action="store_true", help=what)
    s.set_defaults(func=cmd_val)



def _add_fold_bn(s) -> None:
    s.add_argument("--fold-bn", choices=("auto", "on", "off"), default="auto",
                   help="BatchNorm folded into the convolution before it: fewer passes over memory, the same "
                        "outputs in fp32 (checked at load); auto: in fp32 only (bf16 rounds folded weights "
                        "differently)")


def _add_predict(sub) -> None:
    s = sub.add_parser("predict", help="predict images or folders with a checkpoint", formatter_class=_fmt())
    s.add_argument("sources", nargs="+", metavar="IMAGES_OR_FOLDERS")
    s.add_argument("--weights", required=True, help="a best.pt / last.pt written by `cnnkit train`, or the .onnx "
                   "`cnnkit export` wrote (run by onnxruntime); with --model, "
                   "pretrained weights (imagenet, a torchvision weight name, or a file)")
    s.add_argument("--model", default=None, help="predict with this registry model and --weights instead of a checkpoint")
    s.add_argument("--download", action="store_true", help="allow downloading torchvision weights")
    for flag, owners in _predict_flags().items():  # each task's own: default None = the task's default
        spec = dict(next(task_class(o).predict_flags[flag] for o in owners))
        default = spec.pop("default", None)
        spec["help"] = spec.get("help", "") + (f" (default: {default})" if default is not None else "")
        s.add_argument(flag, default=None, **spec)
    s.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="images per batch")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    s.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="auto: measured on this CPU and model (bf16 when at least 1.1x faster); bf16 / fp16 on CUDA")
    s.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="memory format (auto: measured on this CPU and model; on with CUDA)")
    _add_fold_bn(s)
    s.add_argument("--out", default=None, help="output folder (default: runs/<task>/predict)")
    s.add_argument("--show", type=COUNT, default=20, help="print this many results")
    s.set_defaults(func=cmd_predict)



def _add_export(sub) -> None:
    s = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript, checked against PyTorch",
                       formatter_class=_fmt())
    s.add_argument("--weights", required=True, help="a best.pt / last.pt written by `cnnkit train`")
    s.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="file format")
    s.add_argument("--out", default=None, help="output file (default: beside --weights, same stem, .onnx / .ts)")
    s.add_argument("--img-size", type=int, default=None, help="input height = width (default: the checkpoint's)")
    s.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    s.add_argument("--batch-size", type=int, default=1, help="batch of the example input (the ONNX batch is dynamic)")
    s.add_argument("--with-nms", action="store_true", help="detect: put decoding, thresholding and NMS in the graph; "
                   "outputs detections [N, max-det, 6] (x1, y1, x2, y2, score, class) and count [N]")
    s.add_argument("--conf-threshold", type=float, default=0.25, help="detect --with-nms: lowest class-specific confidence kept")
    s.add_argument("--iou-threshold", type=float, default=0.5, help="detect --with-nms: NMS IoU threshold")
    s.add_argument("--max-det", type=int, default=100, help="detect --with-nms: detections per image")
    s.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="run the file on random and real images at two batch sizes and require PyTorch's outputs within 1e-4")
    s.set_defaults(func=cmd_export)



def _add_data(sub) -> None:
    from cnnkit.data.formats import FORMATS

    s = sub.add_parser("data", help="dataset tools: convert between formats, generate the scene data",
                       formatter_class=_fmt())
    dsub = s.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    d = dsub.add_parser("convert", help="convert a detection dataset between YOLO txt, COCO JSON and Pascal VOC XML",
                        formatter_class=_fmt())
    d.add_argument("src", help="a dataset folder or data YAML (format detected)")
    d.add_argument("dst", help="output folder (must not exist or be empty)")
    d.add_argument("--to", required=True, choices=list(FORMATS), help="output format")
    d.add_argument("--on-bad-label", choices=("error", "skip"), default="error", help="what a malformed label does")
    d.set_defaults(func=cmd_data_convert)
    d = dsub.add_parser("check", help="check a dataset before training: counts per split and class, every problem "
                        "grouped by kind (exit 0 clean, 1 only skippable problems, 2 fatal ones)", formatter_class=_fmt())
    d.add_argument("data", help="what `cnnkit train TASK --data` takes: a built-in name, folder or data YAML")
    d.add_argument("--task", required=True, choices=task_names(), help="the task it is for")
    d.add_argument("--fast", action="store_true", help="read labels and file headers only, decode no image")
    d.set_defaults(func=cmd_data_check)
    d = dsub.add_parser("scenes", help="generate detection/segmentation scenes: Fashion-MNIST items on real "
                        "backgrounds, as YOLO txt + COCO JSON + index masks", formatter_class=_fmt())
    d.add_argument("out", help="output folder")
    d.add_argument("--n-train", type=POSITIVE_INT, default=4000, help="training scenes")
    d.add_argument("--n-val", type=COUNT, default=300, help="validation scenes")
    d.add_argument("--img-size", type=_number(int, 28, 8192), default=160, help="scene height = width")
    d.add_argument("--seed", type=int, default=0, help="same seed, same files")
    d.set_defaults(func=cmd_data_scenes)



def _add_tools(sub) -> None:
    from cnnkit.demo import demo_tasks

    s = sub.add_parser("weights", help="pretrained weights: what is available offline and what needs a download",
                       formatter_class=_fmt())
    wsub = s.add_subparsers(dest="weights_command", required=True, parser_class=_Parser)
    w = wsub.add_parser("list", help="list every known weight and where it comes from", formatter_class=_fmt())
    w.set_defaults(func=cmd_weights_list)

    s = sub.add_parser("report", help="one self-contained HTML page of one or more runs: config, metrics, curves, "
                       "confusion matrix / PR curves, best and worst validation predictions", formatter_class=_fmt())
    s.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs/<task>/<name> folders")
    s.add_argument("--out", default=None, help="the HTML file (default: RUN_DIR/report.html for one run, "
                   "./report.html for several)")
    s.add_argument("--gallery", type=int, default=8, help="best and worst validation images shown per run (0 = none)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("demo", help="train, evaluate and draw each task on the embedded data", formatter_class=_fmt())
    s.add_argument("--task", choices=("all", *demo_tasks()), default="all", help="which demo runs")
    s.add_argument("--quick", action="store_true", help="a smoke run (one epoch; two steps for detect/segment)")
    s.set_defaults(func=cmd_demo)



def _add_explain(sub) -> None:
    from cnnkit.explain import DEFAULT_OUT, TOPICS, topic_defaults

    s = sub.add_parser("explain", help="the chapter's figures, computed with cnnkit.ops: text here and a PNG",
                       formatter_class=_fmt())
    s.add_argument("topic", choices=TOPICS)
    s.add_argument("model", nargs="?", default=None, help="receptive-field: a registered model (see `cnnkit models`)")
    s.add_argument("--input", type=int, default=None, help=f"input side (default: {topic_defaults('input_size')}; "
                   "auto = the model's image size)")
    s.add_argument("--kernel", type=int, default=None, help=f"kernel side (default: {topic_defaults('kernel')})")
    s.add_argument("--stride", type=int, default=None, help=f"stride; upsample: the factor (default: "
                   f"{topic_defaults('stride')}; auto = the kernel)")
    s.add_argument("--padding", type=int, default=None, help=f"zero padding (default: {topic_defaults('padding')})")
    s.add_argument("--output-padding", type=int, default=None,
                   help=f"extra bottom/right rows (default: {topic_defaults('output_padding')})")
    s.add_argument("--activation", default=None, help="relu, leaky_relu, sigmoid, tanh or identity "
                   f"(default: {topic_defaults('activation')})")
    s.add_argument("--at", default=None, metavar="ROW,COL", help="output pixel whose sum is spelled out "
                   "(default: the centre)")
    s.add_argument("--in-channels", type=int, default=None,
                   help=f"input channels (default: {topic_defaults('in_channels')})")
    s.add_argument("--out-channels", type=int, default=None,
                   help=f"output channels (default: {topic_defaults('out_channels')})")
    s.add_argument("--layer", default=None, help="receptive-field: the layer whose unit is drawn "
                   "(default: the last with a fixed window)")
    s.add_argument("--out", default=DEFAULT_OUT, help="folder for the PNG")
    s.add_argument("--seed", type=int, default=0, help="seed of the random integer inputs")
    s.set_defaults(func=cmd_explain)


def _refuse_extra(args, extra: list[str]) -> None:
    """Arguments no parser took: another task's option gets a line naming both tasks' options."""
    task = getattr(args, "task", None) if args.command == "train" else None
    for arg in extra:
        flag = arg.split("=", 1)[0]
        owners = [t for t in task_names() if t != task and flag in task_flags(t)] if task else []
        if owners:
            own = ", ".join(task_flags(task)) or "none"
            raise UsageError(f"{flag} is an option of the {' and '.join(owners)} task, not of {task}",
                             fix=f"drop it; the {task} task's own options: {own}")
    raise UsageError(f"cnnkit: unrecognized arguments: {' '.join(extra)}", fix="see `cnnkit --help`")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra:
            _refuse_extra(args, extra)
        args.epochs_given = "--epochs" in argv or any(a.startswith("--epochs=") for a in argv)
        return int(args.func(args) or 0)
    except CnnkitError as exc:
        print("cnnkit: error: " + " ".join(str(exc).split()), file=sys.stderr)  # always one line
        return exc.exit_code
    except KeyboardInterrupt:
        print("cnnkit: interrupted (the last finished epoch is in weights/last.pt; use --resume)", file=sys.stderr)
        return 130
