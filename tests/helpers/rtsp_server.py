"""A live RTSP camera for the tests: GStreamer's gst-rtsp-server publishing H.264 video and
AAC audio on loopback. Run by the system python (python3-gi), not the venv:

    /usr/bin/python3 tests/helpers/rtsp_server.py PORT [--size WxH] [--fps N] [--lifetime S]

Prints "READY rtsp://127.0.0.1:PORT/live" once it listens, and exits on SIGTERM or after
``--lifetime`` seconds (so a test that dies leaves no server behind).
"""

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--size", default="160x120")
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--lifetime", type=float, default=120)
    parser.add_argument("--no-audio", action="store_true")
    args = parser.parse_args()
    w, h = args.size.split("x")
    Gst.init(None)
    video = (f"videotestsrc is-live=true pattern=ball ! video/x-raw,width={w},height={h},framerate={args.fps}/1 "
             f"! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={args.fps} bframes=0 "
             "! rtph264pay name=pay0 pt=96 config-interval=1")
    audio = ("audiotestsrc is-live=true wave=sine freq=440 ! audio/x-raw,rate=44100,channels=1 ! audioconvert "
             "! avenc_aac ! rtpmp4gpay name=pay1 pt=97")
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(f"( {video} {'' if args.no_audio else audio} )")
    factory.set_shared(True)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    server.get_mount_points().add_factory("/live", factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)
    GLib.timeout_add(int(args.lifetime * 1000), loop.quit)
    print(f"READY rtsp://127.0.0.1:{args.port}/live", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
