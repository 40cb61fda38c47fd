from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from segsynth.cli.common import add_backend, add_cache_dir, add_generator, tier
from segsynth.core.config import ModelConfig, ServiceConfig
from segsynth.core.errors import InputError

log = logging.getLogger("segsynth")


def _serve(args: argparse.Namespace) -> int:
    token = os.environ.get("SEGSYNTH_TOKEN") or None  # read here, at the edge
    if args.token:
        log.warning("warning: --token is visible to every user of this machine in its process list; use "
                    "--token-file FILE or SEGSYNTH_TOKEN")
        token = args.token
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise InputError(f"--token-file {args.token_file}: {exc.strerror or exc}") from None
        if not token:
            raise InputError(f"--token-file {args.token_file}: the file is empty")
    cfg = ServiceConfig(host=args.host, port=args.port, token=token, media_root=args.media_root, config=args.config,
                        protect_metrics=args.protect_metrics, grace=args.grace, max_streams=args.max_streams,
                        max_outputs=args.max_outputs, max_model_sets=args.max_model_sets,
                        model_keep_alive=args.model_keep_alive)  # checked before any model loads
    model_cfg = ModelConfig(segmenter=args.segmenter, generator=args.generator, threads=args.threads,
                            cache_dir=args.cache_dir, backend=args.backend, fp16=not args.fp32,
                            fused=args.fused, models=tier(args, True), seg_size=args.seg_size)
    # imported here: the service needs FastAPI (the serve extra) and the jobs load av and onnxruntime
    from segsynth.jobs.models import load_models
    from segsynth.serve.app import serve
    from segsynth.serve.model_sets import ModelSets

    with load_models(model_cfg) as models:
        sets = ModelSets(models, model_cfg, loader=load_models, limit=cfg.max_model_sets,
                         keep_alive=cfg.model_keep_alive)
        return serve(cfg, models, sets)


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="many live streams in one service: HTTP API and /metrics",
                       description="Run stream sessions over one set of models behind an HTTP API "
                       "(/v1/streams, /healthz, /readyz, /metrics; OpenAPI at /openapi.json) and the studio, a web "
                       "page for doodles, styles and live views, at /.",
                       epilog="example: segsynth serve --port 8080 --media-root /srv/media, then open "
                              "http://127.0.0.1:8080/")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback; others need a token)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    p.add_argument("--config", metavar="streams.yaml", help="streams to start at boot ('streams:' list of POST bodies)")
    p.add_argument("--token-file", metavar="FILE", help="every /v1 call needs 'Authorization: Bearer TOKEN', the "
                                                         "token read from FILE (or from $SEGSYNTH_TOKEN)")
    p.add_argument("--token", help="the token itself (visible in the process list: prefer --token-file)")
    p.add_argument("--protect-metrics", action="store_true", help="/metrics needs the token too")
    p.add_argument("--media-root", metavar="DIR", help="file sources, style images and file outputs must lie under "
                                                       "DIR (default: none; without it the service reads and writes "
                                                       "no files, only live sources and network outputs)")
    p.add_argument("--max-streams", type=int, default=ServiceConfig.max_streams, metavar="N",
                   help=f"streams at once (default {ServiceConfig.max_streams}; more get 429)")
    p.add_argument("--max-outputs", type=int, default=ServiceConfig.max_outputs, metavar="N",
                   help=f"outputs a stream may have (default {ServiceConfig.max_outputs})")
    p.add_argument("--max-model-sets", type=int, default=ServiceConfig.max_model_sets, metavar="N",
                   help="model sets loaded at once, this service's own included: a stream may name other models "
                        "(segmenter, generator, models), loaded on first use and shared; beyond N, 503")
    p.add_argument("--model-keep-alive", type=float, default=ServiceConfig.model_keep_alive, metavar="SECONDS",
                   help="an unused model set is unloaded this long after its last stream was deleted")
    p.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT: drain streams this long, then abort them (default 10)")
    p.add_argument("--segmenter", default="ade20k+voc", metavar="NAME|FILE.onnx",
                   help="the segmenter of the streams that name none (segsynth models list shows the names)")
    add_generator(p)
    p.add_argument("--threads", type=int, help="inference threads per model (default: all cores)")
    add_cache_dir(p, "where exported generators are cached")
    add_backend(p)
    p.set_defaults(func=_serve)
