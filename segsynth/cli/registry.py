"""``segsynth models``: the models segsynth knows by name (list, pull, add, path, rm);
segsynth.jobs.registry does the work."""

from __future__ import annotations

import argparse
import json
import logging

from segsynth.cli.common import add_cache_dir
from segsynth.core import paths
from segsynth.jobs.registry import MIRROR_ENV, Registry

log = logging.getLogger("segsynth")


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def _models(args: argparse.Namespace) -> int:
    registry = Registry(paths.cache_dir(args.cache_dir))
    if args.action == "list":
        rows = registry.listing()
        if args.json:
            print(json.dumps(rows, indent=1))
            return 0
        print(f"{'NAME':<20} {'KIND':<20} {'LABELS':<11} {'SIZE':>9}  {'STATE':<13} LICENCE")
        for r in rows:
            print(f"{r['name']:<20} {'+'.join(r['roles']):<20} {r['label_set']:<11} {_size(r['size']):>9}  "
                  f"{r['state']:<13} {r['licence']}")
        print(f"\n'?': no size is published; models live in {registry.root}")
    elif args.action == "pull":
        registry.pull(args.name, mirror=args.mirror, accept_license=args.accept_license, quiet=args.quiet)
    elif args.action == "add":
        registry.add(args.name, args.source, sha256=args.sha256, kind=args.kind, licence=args.licence or "",
                     quiet=args.quiet)
    elif args.action == "path":
        for p in registry.paths(args.name):
            print(p)
    elif args.action == "rm":
        log.info("removed %s", registry.remove(args.name))
    return 0


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("models", parents=[common], help="models by name: list, pull, add, path, rm",
                       description="The models segsynth knows by name: the bundled ones and official checkpoints it "
                       "fetches (verified, exported to ONNX, cached). Every --segmenter and --generator takes these "
                       "names. Nothing touches the network unless pull or add is asked.",
                       epilog="example: segsynth models pull coco --accept-license, then "
                              "segsynth run clip.mp4 out.mp4 --segmenter coco --generator coco --remap person=bear")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    each = argparse.ArgumentParser(add_help=False)
    add_cache_dir(each, "where models are installed (its models/ folder)")

    a = actions.add_parser("list", parents=[common, each], help="every model: kind, label set, size, licence, state",
                           description="List the models segsynth knows: bundled, installed, or available to pull.",
                           epilog="example: segsynth models list --json")
    a.add_argument("--json", action="store_true", help="one JSON list, with each model's paths")
    a = actions.add_parser("pull", parents=[common, each], help="fetch a model of the manifest and install it",
                           description="Download a model the manifest names (hash-checked), export it to ONNX "
                           "(the export extra) and install it whole: an interrupted or refused pull leaves nothing.",
                           epilog="example: segsynth models pull ade20k-official --accept-license")
    a.add_argument("name", metavar="NAME")
    a.add_argument("--mirror", metavar="URL", help=f"fetch NAME's files from URL/FILE first (also ${MIRROR_ENV}): "
                                                  "for sites without internet")
    a.add_argument("--accept-license", action="store_true",
                   help="accept a non-commercial licence (asked once; the licence is shown when it is needed)")
    a = actions.add_parser("add", parents=[common, each], help="install an official-format checkpoint under a name",
                           description="Install a checkpoint in an official format under NAME: SOURCE is an http(s) "
                           "URL or a local path to a SPADE checkpoint folder (opt.txt, latest_net_G.pth), a "
                           ".tar.gz/.zip of one, or a DeepLab .pth (kazuto1011 or torchvision).",
                           epilog="example: segsynth models add mine https://example.org/ckpt.tar.gz --sha256 HEX")
    a.add_argument("name", metavar="NAME")
    a.add_argument("source", metavar="SOURCE")
    a.add_argument("--sha256", metavar="HEX", help="the file's sha256: a mismatch installs nothing")
    a.add_argument("--kind", choices=("segmenter", "generator"),
                   help="what SOURCE is (default: a .pth is a segmenter, anything else a generator)")
    a.add_argument("--licence", help="its licence, shown by list (default: 'as its source says')")
    a = actions.add_parser("path", parents=[common, each], help="print a model's ONNX graphs, one per line",
                           description="Print the ONNX graphs of an installed or bundled model, one per line "
                           "(a generator's style encoder after it).", epilog="example: segsynth models path coco")
    a.add_argument("name", metavar="NAME")
    a = actions.add_parser("rm", parents=[common, each], help="remove an installed model",
                           description="Remove an installed model (bundled ones stay).",
                           epilog="example: segsynth models rm coco")
    a.add_argument("name", metavar="NAME")
    p.set_defaults(func=_models)
