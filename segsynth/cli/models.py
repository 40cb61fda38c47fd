from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from segsynth.cli.common import (
    add_backend,
    add_cache_dir,
    add_generator,
    add_overwrite,
    add_stabilize,
    check_new_outputs,
    tier,
)
from segsynth.core.config import ExportConfig, ModelConfig
from segsynth.core.errors import InputError
from segsynth.core.grammar import (
    EXPORT_TARGETS,
    FITS,
    STABILIZE_DEFAULT,
    parse_batch,
    parse_overrides,
    parse_size,
    parse_stabilize,
)
from segsynth.jobs.models import load_models

log = logging.getLogger("segsynth")


def _export_size(text: str, flag: str) -> tuple[int, int]:
    """export's WxH -> (H, W), as the export stage takes it. Until 2026-12 export alone read HxW:
    for one release a portrait size is refused, so that an old command is not read the wrong way
    round in silence."""
    w, h = parse_size(text, flag)
    if h > w:
        raise InputError(f"{flag} {text}: sizes are WxH on every command (export read HxW before this release); "
                         f"portrait sizes are refused for this release: did you mean {h}x{w}?",
                         field=flag.lstrip("-").replace("-", "_"))
    return h, w


def _export(args: argparse.Namespace) -> int:
    check_new_outputs([Path(args.out)], args.overwrite, "--out")

    def path(value):
        return Path(value) if value else None

    cfg = ExportConfig(
        what=args.what, out=Path(args.out), checkpoint=path(args.checkpoint), deeplab=path(args.deeplab),
        from_tflite=path(args.from_tflite), size=_export_size(args.size, "--size") if args.size else None,
        seg_size=_export_size(args.seg_size, "--seg-size"), batch=parse_batch(args.batch), argmax=args.argmax,
        label_set=args.label_set, epoch=args.epoch, overrides=parse_overrides(args.opt), model=path(args.model),
        calibrate=tuple(map(Path, args.calibrate or ())), frames=args.frames)
    # imported here: the export stage needs torch
    from segsynth.jobs.export import run_export

    log.info("%s", run_export(cfg))
    return 0


def _dataset(args: argparse.Namespace) -> int:
    # imported here: jobs load av and onnxruntime (1 s): --help stays fast
    from segsynth.jobs.dataset import DatasetConfig, make_dataset

    cfg = DatasetConfig(inputs=tuple(Path(v) for v in args.inputs), out=Path(args.out), every=args.every,
                        size=parse_size(args.size), segmenter=args.segmenter, threads=args.threads,
                        crops_per_image=args.crops_per_image)
    manifest = make_dataset(cfg, quiet=args.quiet)
    log.info("wrote %s: %d image/label pairs (%s, %dx%d)", cfg.out, len(manifest["items"]), manifest["label_set"],
             *manifest["size"])
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.student:
        return _distill(args)
    # imported here: training needs torch
    from segsynth.jobs.train import TrainConfig, train

    cfg = TrainConfig(data=Path(args.data), out=Path(args.out), config=args.config, steps=args.steps,
                      device=args.device, resume=args.resume, batch=args.batch,
                      init_from=Path(args.init_from) if args.init_from else None, sample_every=args.sample_every,
                      save_every=args.save_every, threads=args.threads, seed=args.seed, vae=args.vae,
                      ema=args.ema, lambda_perceptual=args.lambda_perceptual, lambda_l1=args.lambda_l1,
                      lambda_kld=args.lambda_kld)
    result = train(cfg, quiet=args.quiet)
    last = result["history"][-1] if result["history"] else {}
    log.info("trained %d steps; checkpoint in %s (official layout: latest_net_G.pth, latest_net_D.pth, opt.txt)%s",
             result["steps"], cfg.out, f"; last L1 {last.get('G_L1', 0):.3f}" if last else "")
    return 0


def _distill(args: argparse.Namespace) -> int:
    # imported here: training needs torch
    from segsynth.jobs.distill import DistillConfig, distill

    cfg = DistillConfig(data=Path(args.data), out=Path(args.out), teacher=Path(args.student), steps=args.steps,
                        batch=args.batch or 8, threads=args.threads, seed=args.seed, lambda_l1=args.lambda_l1,
                        lambda_perceptual=args.lambda_perceptual, save_every=args.save_every,
                        crop=args.crop or None)
    result = distill(cfg, quiet=args.quiet)
    last = result["history"][-1] if result["history"] else {}
    log.info("distilled %d steps; checkpoint in %s (student.json, student_G.pth)%s", result["steps"], cfg.out,
             f"; last L1 {last.get('l1', 0):.3f}" if last else "")
    return 0


def _eval_generator(args: argparse.Namespace) -> int:
    # imported here: jobs load av and onnxruntime (1 s): --help stays fast
    from segsynth.jobs.eval_generator import evaluate, print_table, write_json

    result = evaluate(args.checkpoint, Path(args.data), segmenter=args.segmenter, limit=args.limit,
                      cache_dir=args.cache_dir, grid=Path(args.grid) if args.grid else None,
                      threads=args.threads, quiet=args.quiet, backend=args.backend, baselines=args.baselines)
    print_table(result)
    if args.grid:
        log.info("wrote %s", args.grid)
    if args.json:
        write_json(result, Path(args.json))
        log.info("wrote %s", args.json)
    return 0


def _eval_temporal(args: argparse.Namespace) -> int:
    # imported here: jobs load av and onnxruntime (1 s): --help stays fast
    from segsynth.jobs.eval_temporal import evaluate
    from segsynth.jobs.progress import Progress
    from segsynth.stream.io import demux

    clip = Path(args.video)
    demux.check_input(clip)
    stabilize = args.stabilize or STABILIZE_DEFAULT
    parse_stabilize(stabilize)
    if args.frames is not None and args.frames < 2:
        raise InputError("--frames must be at least 2 (the measures compare consecutive frames)")
    cfg = ModelConfig(segmenter=args.segmenter, generator=args.generator, threads=args.threads,
                      cache_dir=args.cache_dir, backend=args.backend, fp16=not args.fp32, fused=args.fused,
                      models=tier(args, False), seg_size=args.seg_size)
    with load_models(cfg) as models, Progress("eval-temporal", args.frames,
                                                        enabled=not args.quiet) as progress:
        report = evaluate(clip, models, stabilize=stabilize, remap=args.remap, fit=args.fit, seed=args.seed,
                          max_frames=args.frames, grid=Path(args.grid) if args.grid else None, progress=progress)
    print(f"{clip.name}: {report['frames']} frames")
    print(f"{'stabilize':<14} {'static flips':>12} {'motion agree':>12} {'synth delta':>11} {'static px':>9} "
          f"{'fps':>6}")
    for spec, m in report["methods"].items():
        delta = "-" if m["synth_static_delta"] is None else f"{m['synth_static_delta']:.3f}"
        print(f"{spec:<14} {m['static_flip_rate']:>12.5f} {m['motion_agreement']:>12.3f} {delta:>11} "
              f"{m['static_fraction']:>9.2f} {m['fps']:>6.2f}")
    for name, value in report["ratios"].items():
        print(f"{name}: {'-' if value is None else f'{value:.2f}'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        log.info("wrote %s", args.json)
    return 0


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export", parents=[common], help="export SPADE / DeepLab / the fused chain to ONNX",
        description="Write ONNX graphs following segsynth's I/O contracts. spade: label [+instance] [+z] -> image; "
                    "encoder: style -> mu, logvar; deeplab: image -> logits (or labels); chain: uint8 frames + remap "
                    "table [+z] -> uint8 frames + labels; quantize: a float graph -> int8 (QDQ, calibrated on video frames). "
                    "Needs the export extra (torch), except --from-tflite and quantize. Sizes are WxH.",
        epilog="example: segsynth export spade --checkpoint checkpoints/coco_pretrained --out spade_coco.onnx")
    p.add_argument("what", choices=EXPORT_TARGETS, help="which graph to export")
    p.add_argument("model", nargs="?", metavar="MODEL.onnx", help="quantize: the float segmenter or generator graph")
    p.add_argument("--calibrate", nargs="+", metavar="VIDEO", help="quantize: videos (VIDEO or VIDEO#START-END seconds) to calibrate activation ranges on")
    p.add_argument("--frames", type=int, default=48, help="quantize: calibration frames, spread over the videos (48)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="SPADE: an official checkpoint directory (opt.txt, latest_net_G.pth[, latest_net_E.pth]); "
                        "deeplab: a kazuto1011 DeepLab v2 or torchvision DeepLabV3 .pth")
    p.add_argument("--deeplab", metavar="FILE.pth", help="chain: the DeepLab checkpoint")
    p.add_argument("--from-tflite", metavar="FILE", help="deeplab: convert a DeepLab TFLite model instead")
    p.add_argument("--out", required=True, help="output .onnx file (written only when complete)")
    p.add_argument("--size", metavar="WxH", help="spade: output size (sets crop_size/aspect_ratio); encoder: style "
                                                 "size (default: the checkpoint's, crop_size/aspect_ratio x "
                                                 "crop_size); deeplab: input size (default 513x513); chain: frame size")
    p.add_argument("--seg-size", metavar="WxH", default="513x513", help="chain: segmenter input size")
    p.add_argument("--batch", default="dynamic", metavar="N|dynamic",
                   help="'dynamic' (the default: a symbolic batch dimension, which Triton and trtexec shape "
                        "profiles need) or N (1..64) for a fixed batch size")
    p.add_argument("--argmax", action="store_true", help="deeplab: output uint8 labels instead of logits")
    p.add_argument("--label-set", help="label set of the segmenter (default: guessed from its class count)")
    p.add_argument("--epoch", default="latest", help="SPADE: which {epoch}_net_G.pth to load (default latest)")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="SPADE: override an opt.txt option")
    add_overwrite(p)
    p.set_defaults(func=_export)
    p = sub.add_parser("dataset", parents=[common], help="make image/label training pairs from videos and photos",
                       description="dataset make INPUTS... --out DIR: label video frames and images (or random crops "
                                   "of them) with the default segmenter.",
                       epilog="example: segsynth dataset make clip.mp4 photos/ --out data_256 --size 256x256")
    p.add_argument("action", choices=["make"], help="what to do with the dataset (make: a new one)")
    p.add_argument("inputs", nargs="+", help="video files, image files, folders of images")
    p.add_argument("--out", required=True, help="new output directory (images/, labels/, manifest.json)")
    p.add_argument("--every", type=int, default=1, help="take every N-th frame")
    p.add_argument("--crops-per-image", type=int, default=0, metavar="N",
                   help="images: N random crops of the pair's shape at 30-100%% of the largest that fits "
                        "(default 0: each image whole, stretched)")
    p.add_argument("--size", default="256x256", metavar="WxH", help="pair size")
    p.add_argument("--segmenter", default="ade20k+voc", metavar="NAME|FILE.onnx", help="segmenter used for the labels")
    p.add_argument("--threads", type=int, help="inference threads (default: all cores)")
    p.set_defaults(func=_dataset)
    p = sub.add_parser("train", parents=[common], help="train a SPADE generator on a dataset (needs torch)",
                       description="Train SPADE (hinge GAN + multiscale PatchGAN + feature matching + L1); "
                                   "checkpoints in the official NVlabs layout; or, with --student, distill the "
                                   "CPU-first student generator.",
                       epilog="example: segsynth train --data data_256 --out ckpt --vae --steps 2000 --threads 2")
    p.add_argument("--data", required=True, help="a directory made by segsynth dataset make")
    p.add_argument("--out", required=True, help="checkpoint directory (latest_net_G.pth, latest_net_D.pth, opt.txt)")
    p.add_argument("--student", metavar="TEACHER.onnx",
                   help="distill the CPU-first student generator (segsynth.export.student) from TEACHER, a VAE "
                        "generator graph with its style encoder beside it, instead of training SPADE; resumable "
                        "(student.json, student_G.pth, train_state.pth in --out); uses --steps, --batch (8), "
                        "--threads, --seed, --save-every, --lambda-l1, --lambda-perceptual, --crop")
    p.add_argument("--crop", type=int, default=128, metavar="N",
                   help="--student: train on N x N random crops, a multiple of 8 (default 128; 0: whole pictures)")
    p.add_argument("--config", default="small", choices=["tiny", "small", "base"], help="model size")
    p.add_argument("--steps", type=int, default=1000, help="total training steps")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--init-from", metavar="CKPT_DIR",
                   help="start the generator (and style encoder) from this checkpoint directory: same --config, any "
                        "size, with or without --vae (a missing or differently sized z layer is re-made); D starts "
                        "afresh")
    p.add_argument("--batch", type=int, help="batch size (default: the config's)")
    p.add_argument("--sample-every", type=int, default=100, metavar="K", help="write a sample grid every K steps")
    p.add_argument("--save-every", type=int, default=200, metavar="K", help="write the checkpoint every K steps")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's, all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights' initialisation and the batches")
    p.add_argument("--vae", action="store_true",
                   help="also train the VAE style encoder (so that run can take a style image)")
    p.add_argument("--lambda-perceptual", type=float, default=2.0, metavar="W",
                   help="weight of the perceptual loss through the bundled VOC MobileNetV2 backbone (default 2; 0: off)")
    p.add_argument("--lambda-l1", type=float, default=1.0, metavar="W", help="weight of the pixel L1 loss (default 1)")
    p.add_argument("--lambda-kld", type=float, default=0.05, metavar="W",
                   help="--vae: weight of the KL term (default 0.05, as officially; lower lets z carry more of "
                        "the style image)")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="save a moving average of the generator's weights (e.g. 0.999; default 0: off); the "
                        "trained weights stay in train_state.pth for --resume")
    p.set_defaults(func=_train)
    p = sub.add_parser("eval-generator", parents=[common], help="score a generator: mIoU, pixel accuracy, PSNR, SSIM, "
                                                                        "class colour distance",
                       description="Segment the generated frames and compare with the label maps they came from "
                                   "(the SPADE paper's protocol), plus PSNR/SSIM against the real frames.",
                       epilog="example: segsynth eval-generator default --data heldout_256 --baselines --json scores.json")
    p.add_argument("checkpoint", metavar="CKPT", help="'default', an exported .onnx, or a SPADE checkpoint directory")
    p.add_argument("--data", required=True, help="a held-out dataset made by segsynth dataset make")
    p.add_argument("--json", metavar="OUT", help="write the scores as JSON (miou, pixel_accuracy, fw_iou, psnr, "
                                                 "ssim, colour_distance, frames, real_frames, baselines)")
    p.add_argument("--segmenter", default="ade20k+voc", metavar="NAME|FILE.onnx",
                   help="the segmenter that scores the pictures")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N pairs only")
    p.add_argument("--grid", metavar="OUT.png", help="also write a sample grid: label | real | generated rows")
    p.add_argument("--baselines", action="store_true",
                   help="also score the real frames blurred by 1 pixel and with noise (sigma 10): the ceiling of "
                        "the protocol for any picture that is not the very frame the labels came from")
    p.add_argument("--threads", type=int, help="inference threads (default: all cores)")
    add_cache_dir(p, "where exported generators are cached")
    p.add_argument("--backend", default="auto", help="inference backend (see segsynth run --help)")
    p.set_defaults(func=_eval_generator)
    p = sub.add_parser("eval-temporal", parents=[common], help="measure flicker: label flips where the input "
                                                               "did not change, with and without stabilisation",
                       description="Run a clip through --stabilize (default: the default for video) and through off "
                                   "in the same run: static_flip_rate (labels that change where the input did not), "
                                   "motion_agreement (stabilised labels = the frame's own where it did), "
                                   "synth_static_delta (picture change on static pixels) and fps.",
                       epilog="example: segsynth eval-temporal examples/demo.mp4 --json flicker.json")
    p.add_argument("video", help="a video file")
    add_stabilize(p)
    p.add_argument("--remap", metavar="RULES", help="remap rules, as for run")
    p.add_argument("--segmenter", default="ade20k+voc", metavar="NAME|FILE.onnx", help="the segmenter")
    add_generator(p)
    p.add_argument("--fit", choices=FITS, help="how frames meet the synthesis size (as for run)")
    p.add_argument("--seed", type=int, help="fixed z for VAE generators")
    p.add_argument("--frames", type=int, metavar="N", help="the first N frames only")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    p.add_argument("--grid", metavar="OUT.png", help="also write a frame grid: input | labels off | labels "
                                                     "stabilised | picture off | picture stabilised, consecutive rows")
    p.add_argument("--threads", type=int, help="inference threads (default: all cores)")
    add_cache_dir(p, "where exported generators and fused graphs are cached")
    add_backend(p)
    p.set_defaults(func=_eval_temporal)
