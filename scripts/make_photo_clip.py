"""Write a slow pan/zoom clip over openly licensed photos (for the default generator's data).

Photos: scikit-image's astronaut and rocket (public domain), coffee, chelsea and camera (CC0).
Usage: python scripts/make_photo_clip.py OUT.mp4 [FRAMES_PER_PHOTO]
"""

import sys

import av
import numpy as np
from PIL import Image


def main(out: str, per_photo: int = 24) -> None:
    import skimage.data as data

    photos = [data.astronaut(), data.rocket(), data.coffee(), data.chelsea(), np.repeat(data.camera()[..., None], 3, -1)]
    w, h = 640, 360
    with av.open(out, "w") as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "18"}
        pts = 0
        for photo in photos:
            img = Image.fromarray(photo)
            pw, ph = img.size
            for i in range(per_photo):
                zoom = 1.0 - 0.25 * i / per_photo  # crop window shrinks: a slow zoom in
                cw, ch = pw * zoom, min(ph, pw * zoom * h / w)
                x0, y0 = (pw - cw) * i / per_photo, (ph - ch) / 2
                frame = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
                f = av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")
                f.pts = pts
                pts += 1
                c.mux(s.encode(f))
        c.mux(s.encode(None))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 24)
