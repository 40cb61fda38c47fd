"""The web studio of ``segsynth serve``: its endpoints (/v1/labels, /v1/segment, /v1/synthesize,
/v1/style, live.mjpg) over HTTP, and the page itself in Debian's Chromium driven by Playwright,
against a real server on loopback with a tiny VAE generator (random weights: what is checked is
that pictures change where and when they should, not what they look like). Screenshots go to
build/test-artifacts/studio (or $SEGSYNTH_ARTIFACTS/studio)."""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_spade_checkpoint, run_cli
from test_serve import api, free_port, service, voc_class_of_red

pytestmark = pytest.mark.network
CHROMIUM = "/usr/bin/chromium"
# Debian's chromium run headless as root in a container: no sandbox, and nothing that calls home
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("SEGSYNTH_ARTIFACTS", REPO / "build" / "test-artifacts")) / "studio"
RED = "lavfi:color=c=red:size=160x120:rate=10"
TINY_VAE = dict(label_nc=150, contain_dontcare_label=True, no_instance=True, ngf=4, crop_size=64, use_vae=True,
                z_dim=8, norm_G="spectralspadebatch3x3")  # ADE20K's 150 classes, 64 x 64


@pytest.fixture(scope="module")
def vae_generator(tmp_path_factory) -> Path:
    """A tiny random-init VAE SPADE checkpoint exported to gen.onnx + gen-encoder.onnx (its style
    encoder). Random weights hardly let the labels show, so the SPADE blocks' modulation
    (mlp_gamma, mlp_beta) is scaled up 10x; batch norm (not instance norm, whose per-picture
    statistics spread a change everywhere) keeps a label change local."""
    import torch

    d = tmp_path_factory.mktemp("studio-generator")
    make_spade_checkpoint(d / "ckpt", **TINY_VAE)
    weights = torch.load(d / "ckpt" / "latest_net_G.pth")
    for name in weights:
        if name.endswith(("mlp_gamma.weight", "mlp_beta.weight")):
            weights[name] *= 10
    torch.save(weights, d / "ckpt" / "latest_net_G.pth")
    for what, out in (("spade", "gen.onnx"), ("encoder", "gen-encoder.onnx")):
        proc = run_cli("export", what, "--checkpoint", d / "ckpt", "--out", d / out)
        assert proc.returncode == 0, proc.stderr
    return d / "gen.onnx"


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_segmenter, vae_generator):
    """(base URL, media root) of one ``segsynth serve`` with the tiny segmenter and generator."""
    with service(tmp_path_factory.mktemp("studio"), tiny_segmenter, generator=vae_generator) as (base, root, _):
        yield base, root


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 760}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(30_000)
    try:
        yield page
    finally:
        context.close()
    assert not errors, errors


# ---- helpers ------------------------------------------------------------------------------------
def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    """A PNG of ``array``; mode "P": ids with ADE20K's palette (a colour label map, as datasets ship them)."""
    from PIL import Image

    from segsynth.core import labels

    image = Image.fromarray(array, mode)
    if mode == "P":
        image.putpalette(labels.get("ade20k").palette.tobytes())
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def post(base: str, path: str, files: dict, fields: dict | None = None, headers: dict | None = None):
    """(status, body bytes, content type) of one multipart POST (the way browsers send forms)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in (fields or {}).items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}.png"\r\n'
              f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for k, data in files.items()]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(base + path, data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as reply:
            return reply.status, reply.read(), reply.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers["Content-Type"]


def synthesize(base: str, ids: np.ndarray, **fields) -> np.ndarray:
    status, body, kind = post(base, "/v1/synthesize", {"labels": png_bytes(ids, "L")}, fields)
    assert status == 200 and kind == "image/png", body[:300]
    return decode(body)


def error(reply) -> dict:
    status, body, _ = reply
    return {"status": status, **json.loads(body)}


def class_id(name: str) -> int:
    from segsynth.core import labels

    return labels.get("ade20k").id_of(name)


def shown_picture(page, selector: str) -> np.ndarray:
    """The pixels an <img> of the page shows (drawn into a canvas there)."""
    url = page.evaluate("""(selector) => {
        const img = document.querySelector(selector);
        const canvas = document.createElement("canvas");
        [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight];
        canvas.getContext("2d").drawImage(img, 0, 0);
        return canvas.toDataURL("image/png");
    }""", selector)
    return decode(base64.b64decode(url.split(",", 1)[1]))[..., :3]


def settled(page, after: int) -> np.ndarray:
    """Wait for a picture newer than number ``after`` and no change still pending; return it."""
    page.wait_for_function(f"Number(document.body.dataset.pictureSeq || 0) > {after} "
                           "&& document.body.dataset.pending === 'false'")
    return shown_picture(page, "#picture")


def seq(page) -> int:
    return int(page.evaluate("Number(document.body.dataset.pictureSeq || 0)"))


def stroke(page, points: list[tuple[float, float]]) -> None:
    """Drag the mouse over the canvas through ``points`` (fractions of its width and height)."""
    box = page.locator("#canvas").bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for x, y in xy[1:]:
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


def pick(page, name: str) -> None:
    page.fill("#palette-search", name)
    page.locator("#palette li:not([hidden])", has_text=name).first.click()
    assert page.text_content("#current-class") == name


def change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


def open_studio(page, base: str) -> np.ndarray:
    page.goto(base + "/")
    page.wait_for_selector("body[data-ready=true]")
    return settled(page, 0)


# ---- the endpoints --------------------------------------------------------------------------------
def test_synthesize_segment_and_style_endpoints(studio, tiny_segmenter, astronaut):
    from segsynth.core import labels

    base, _ = studio
    status, info = api(base, "GET", "/v1/labels")
    ade = labels.get("ade20k")
    assert status == 200 and info["label_set"] == "ade20k" and info["size"] == [64, 64]
    assert info["style"] is True and info["z_dim"] == 8 and info["segmenter_label_set"] == "voc"
    assert [c["name"] for c in info["classes"]] == list(ade.classes)
    assert all(c["color"] == "#%02x%02x%02x" % tuple(ade.palette[c["id"]]) for c in info["classes"])

    sky = np.full((64, 64), class_id("sky"), np.uint8)
    first = synthesize(base, sky, seed=1)
    assert first.shape == (64, 64, 3) and first.std() > 1
    assert np.array_equal(synthesize(base, sky, seed=1), first)  # the same seed, the same picture
    assert change(synthesize(base, sky, seed=2), first) > 1  # another z
    grass = sky.copy()
    grass[:, :24] = class_id("grass")
    painted = synthesize(base, grass, seed=1)
    assert change(painted[:, :20], first[:, :20]) > 2 * max(change(painted[:, 44:], first[:, 44:]), 0.5)
    # any size is scaled to the generator's; a palette PNG's indices are ids too
    big = np.repeat(np.repeat(grass, 2, 0), 2, 1)
    assert np.array_equal(synthesize(base, big, seed=1), painted)
    status, body, _ = post(base, "/v1/synthesize", {"labels": png_bytes(grass, "P")}, {"seed": 1})
    assert status == 200 and np.array_equal(decode(body), painted)
    # no z given: seed 0
    assert np.array_equal(synthesize(base, grass), synthesize(base, grass, seed=0))

    # style: the encoder's z, sent back as z, paints what the style image itself paints
    status, body, kind = post(base, "/v1/style", {"image": png_bytes(astronaut)})
    assert status == 200 and kind == "application/json", body
    z = json.loads(body)["z"]
    assert len(z) == 8 and np.std(z) > 1e-4
    styled = synthesize(base, grass, z=json.dumps(z))
    status, body, _ = post(base, "/v1/synthesize", {"labels": png_bytes(grass, "L"), "style": png_bytes(astronaut)})
    assert status == 200 and np.array_equal(decode(body), styled)
    other = json.loads(post(base, "/v1/style", {"image": png_bytes(astronaut[::-1, ::-1].copy())})[1])["z"]
    assert not np.allclose(z, other)
    assert change(styled, painted) > 1

    # segment: a flat red photo is one VOC class for the tiny segmenter, in ADE20K's ids
    red = np.zeros((90, 160, 3), np.uint8)
    red[..., 0] = 255
    status, body, _ = post(base, "/v1/segment", {"image": png_bytes(red)})
    assert status == 200, body
    result = json.loads(body)
    voc = labels.get("voc")
    want = int(labels.mapping(voc, ade)[voc.id_of(voc_class_of_red(tiny_segmenter))])
    ids = decode(base64.b64decode(result["labels"].split(",", 1)[1]))
    assert ids.dtype == np.uint8 and ids.ndim == 2 and ids.shape == (64, 64) and (ids == want).all()
    assert result["legend"] == [{"id": want, "name": ade.name_of(want), "color": "#%02x%02x%02x" % tuple(ade.palette[want]),
                                 "fraction": 1.0}]
    status, body, _ = post(base, "/v1/segment", {"image": png_bytes(astronaut)})
    legend = json.loads(body)["legend"]
    assert status == 200 and abs(sum(c["fraction"] for c in legend) - 1) < 0.01

    status, schema = api(base, "GET", "/openapi.json")
    for path in ("/v1/segment", "/v1/synthesize", "/v1/style", "/v1/labels", "/v1/streams/{stream_id}/live.mjpg"):
        assert path in schema["paths"], path
    assert "multipart/form-data" in schema["paths"]["/v1/synthesize"]["post"]["requestBody"]["content"]


def test_uploads_are_capped_and_checked_with_clear_4xx_errors(studio):
    base, _ = studio
    sky = np.full((64, 64), class_id("sky"), np.uint8)
    bad_ids = sky.copy()
    bad_ids[0, :3] = (150, 200, 254)
    huge = png_bytes(np.zeros((4097, 4097), np.uint8))  # compresses to a few KB
    cases = [
        (("/v1/synthesize", {"labels": png_bytes(bad_ids, "L")}, {}), 422, "labels", "ids 150, 200, 254 are not classes of ade20k"),
        (("/v1/synthesize", {"labels": png_bytes(np.zeros((8, 8, 3), np.uint8))}, {}), 422, "labels", "8-bit grayscale"),
        (("/v1/synthesize", {"labels": b"GIF89a not really"}, {}), 422, "labels", "not an image"),
        (("/v1/synthesize", {"labels": b""}, {}), 422, "labels", "empty"),
        (("/v1/synthesize", {}, {"seed": 1}), 422, "labels", "required"),
        (("/v1/synthesize", {"labels": huge}, {}), 413, "labels", "4097 x 4097 pixels is over the limit of 16777216"),
        (("/v1/synthesize", {"labels": png_bytes(sky)}, {"seed": -1}), 422, "seed", "greater than or equal to 0"),
        (("/v1/synthesize", {"labels": png_bytes(sky)}, {"seed": "many"}), 422, "seed", "integer"),
        (("/v1/synthesize", {"labels": png_bytes(sky)}, {"z": "[1, 2]"}), 422, "z", "8 finite numbers are needed, got 2"),
        (("/v1/synthesize", {"labels": png_bytes(sky)}, {"z": "{oops"}), 422, "z", "JSON list"),
        (("/v1/synthesize", {"labels": png_bytes(sky)}, {"seed": 1, "z": json.dumps([0] * 8)}), 422, "z",
         "one of style, seed and z"),
        (("/v1/style", {"image": b"\x89PNG\r\n\x1a\n truncated"}, {}), 422, "image", "not an image"),
        (("/v1/segment", {"image": huge}, {}), 413, "image", "over the limit"),
        (("/v1/synthesize", {"labels": os.urandom(9 << 20)}, {}), 413, None, "request body over 8388608 bytes"),
    ]
    for (path, files, fields), code, field, message in cases:
        reply = error(post(base, path, files, fields))
        assert reply["status"] == code and reply["field"] == field and message in reply["error"], (path, fields, reply)
    # the JSON endpoints keep their small limit
    status, reply = api(base, "POST", "/v1/streams", raw=json.dumps({"source": "x" * 70000}).encode())
    assert status == 413 and "65536 bytes" in reply["error"]
    assert api(base, "GET", "/v1/streams/nope/live.mjpg")[0] == 404


def test_without_a_generator_and_behind_a_token(tmp_path, tiny_segmenter, browser):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    auth = {"Authorization": "Bearer s3cret"}
    with service(tmp_path, tiny_segmenter, "--token-file", token) as (base, _, _):
        assert api(base, "GET", "/v1/labels")[0] == 401
        assert post(base, "/v1/synthesize", {"labels": png_bytes(np.zeros((8, 8), np.uint8))})[0] == 401
        status, info = api(base, "GET", "/v1/labels", headers=auth)
        assert status == 200 and info["generator"] is False and info["label_set"] == "voc" and info["size"] == [64, 64]
        reply = error(post(base, "/v1/synthesize", {"labels": png_bytes(np.zeros((8, 8), np.uint8))}, headers=auth))
        assert reply["status"] == 409 and "no generator" in reply["error"]
        assert error(post(base, "/v1/style", {"image": png_bytes(np.zeros((8, 8, 3), np.uint8))}, headers=auth))["status"] == 409
        status, body, _ = post(base, "/v1/segment", {"image": png_bytes(np.zeros((30, 40, 3), np.uint8))}, headers=auth)
        assert status == 200 and json.loads(body)["label_set"] == "voc"
        # the page itself is public; it asks for the token, then paints (without a picture)
        context = browser.new_context()
        try:
            page = context.new_page()
            page.goto(base + "/")
            page.wait_for_selector("#token-form:not([hidden])")
            page.fill("#token", "s3cret")
            page.click("#token-form button")
            page.wait_for_selector("body[data-ready=true]")
            assert "no generator" in page.text_content("#status")
            assert page.locator("#palette li").count() == 21
        finally:
            context.close()


# ---- the page ------------------------------------------------------------------------------------------
def test_the_studio_opens_on_a_landscape_doodle_painted_in_colours_of_its_classes(studio, page):
    from segsynth.core import labels

    base, _ = studio
    picture = open_studio(page, base)
    with page.expect_download() as download:
        page.click("#download-labels")
    ids = decode(Path(download.value.path()).read_bytes())
    shares = {name: float((ids == class_id(name)).mean()) for name in ("sky", "mountain", "grass", "tree", "water")}
    assert all(share > 0.02 for share in shares.values()) and sum(shares.values()) > 0.99, shares
    assert (ids[:5] == class_id("sky")).all() and (ids[-3:] != class_id("sky")).all()  # sky above, land below
    assert np.array_equal(picture, synthesize(base, ids, seed=0))  # its picture is shown at once
    shown = page.evaluate("""() => { const c = document.querySelector('#canvas');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""")
    shown = np.array(shown, np.uint8).reshape(64, 64, 4)[..., :3]
    ade = labels.get("ade20k")
    for name in ("sky", "grass", "water"):  # painted in the colours people give them, not the label palette's
        where = ids == class_id(name)
        assert (shown[where] == labels.DOODLE_COLOURS[name]).all(), name
        assert labels.DOODLE_COLOURS[name] != tuple(ade.palette[class_id(name)])
    screenshot(page, "first-view.png")


def test_doodle_paints_two_classes_and_the_picture_changes_where_painted(studio, page):
    base, _ = studio
    open_studio(page, base)
    assert page.text_content("#current-class") == "sky"
    before = seq(page)
    page.click("#clear")  # all sky: the strokes below are what changes
    start = settled(page, before)
    pick(page, "grass")
    stroke(page, [(0.05, 0.2), (0.95, 0.2)])  # a band across the top
    grass = settled(page, seq(page))
    pick(page, "person")
    page.fill("#brush-size", "16")
    page.dispatch_event("#brush-size", "input")
    stroke(page, [(0.05, 0.8), (0.5, 0.8), (0.95, 0.8)])  # and one across the bottom
    person = settled(page, seq(page))
    top, bottom = slice(9, 17), slice(47, 55)
    assert change(grass[top], start[top]) > 2 * max(change(grass[bottom], start[bottom]), 0.5)
    assert change(person[bottom], grass[bottom]) > 2 * max(change(person[top], grass[top]), 0.5)
    screenshot(page, "doodle.png")

    with page.expect_download() as download:
        page.click("#download-labels")
    ids = decode(Path(download.value.path()).read_bytes())
    assert ids.ndim == 2 and ids.shape == (64, 64)
    assert (ids[top] == class_id("grass")).mean() > 0.9 and (ids[bottom] == class_id("person")).mean() > 0.9
    assert (ids[28:36] == class_id("sky")).all()
    with page.expect_download() as download:
        page.click("#download-picture")
    assert np.array_equal(decode(Path(download.value.path()).read_bytes())[..., :3], person)

    # undo takes the person back out: the picture is the one before it again
    page.click("#undo")
    assert np.array_equal(settled(page, seq(page)), grass)
    page.click("#redo")
    assert np.array_equal(settled(page, seq(page)), person)
    # fill: the sky between the bands becomes water
    pick(page, "water")
    page.check("input[value=fill]")
    box = page.locator("#canvas").bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    water = settled(page, seq(page))
    assert change(water[28:36], person[28:36]) > 1
    page.click("#clear")
    assert settled(page, seq(page)).shape == (64, 64, 3)


def test_a_label_map_and_a_photo_open_as_starting_points(studio, page, tmp_path, astronaut):
    base, _ = studio
    open_studio(page, base)
    ids = np.full((64, 64), class_id("sky"), np.uint8)
    ids[32:] = class_id("sea")
    (tmp_path / "map.png").write_bytes(png_bytes(np.repeat(np.repeat(ids, 3, 0), 3, 1), "L"))  # 192 x 192
    before = seq(page)
    page.set_input_files("#upload-labels", str(tmp_path / "map.png"))
    opened = settled(page, before)
    assert np.array_equal(opened, synthesize(base, ids, seed=0))
    before = seq(page)
    (tmp_path / "photo.png").write_bytes(png_bytes(astronaut))
    page.set_input_files("#upload-photo", str(tmp_path / "photo.png"))
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('segmented')")
    segmented = settled(page, before)
    _, body, _ = post(base, "/v1/segment", {"image": png_bytes(astronaut)})
    from_server = decode(base64.b64decode(json.loads(body)["labels"].split(",", 1)[1]))
    assert np.array_equal(segmented, synthesize(base, from_server, seed=0))


def test_a_style_image_and_shuffle_change_the_picture(studio, page, tmp_path, astronaut):
    base, _ = studio
    start = open_studio(page, base)
    page.click("nav button[data-view=style]")
    (tmp_path / "astronaut.png").write_bytes(png_bytes(astronaut))
    before = seq(page)
    page.set_input_files("#upload-style", str(tmp_path / "astronaut.png"))
    styled = settled(page, before)
    assert change(styled, start) > 1
    assert np.array_equal(shown_picture(page, "#style-picture"), styled)
    assert "astronaut.png" in page.text_content("#z-source")
    screenshot(page, "style.png")
    before, seed_before = seq(page), page.input_value("#seed")
    page.click("#shuffle")
    shuffled = settled(page, before)
    assert change(shuffled, styled) > 1 and page.input_value("#seed") not in ("", seed_before)  # a new seed shown
    # the style is kept while painting: the doodle's next picture uses the same z
    page.click("nav button[data-view=doodle]")
    with page.expect_download() as download:
        page.click("#download-labels")
    doodle = decode(Path(download.value.path()).read_bytes())  # the starter landscape
    assert np.array_equal(shuffled, synthesize(base, doodle, seed=int(page.input_value("#seed"))))


def test_live_view_of_a_lavfi_stream_and_a_remap_change(studio, tiny_segmenter, page):
    from segsynth.core import labels

    base, _ = studio
    status, made = api(base, "POST", "/v1/streams", {"id": "red", "source": RED,
                                                       "sinks": [f"mjpeg://127.0.0.1:{free_port()}"]})
    assert status == 201, made
    try:
        page.goto(base + "/")
        page.wait_for_selector("body[data-ready=true]")
        page.click("nav button[data-view=live]")
        page.wait_for_function("Number(document.querySelector('#live-view').dataset.frames || 0) >= 2")
        frame = shown_picture(page, "#live-view")
        assert frame.shape[0] == 240 and frame.shape[1] == 3 * 320  # input | labels | synthesis at 4:3
        assert frame[120, 300, 0] > 200 and frame[120, 300, 1:].max() < 60  # the input: red
        ade = labels.get("ade20k")
        name = voc_class_of_red(tiny_segmenter)
        before = ade.palette[labels.mapping(labels.get("voc"), ade)[labels.get("voc").id_of(name)]]
        assert np.abs(frame[200, 620].astype(int) - before).max() < 40  # the labels panel, below its legend
        page.fill("#remap", f"{name}=grass")
        page.click("#remap-form button")
        page.wait_for_function("document.querySelector('#remap-status').textContent.includes('grass')")
        assert api(base, "GET", "/v1/streams/red")[1]["config"]["remap"] == f"{name}=grass"
        grass = ade.palette[class_id("grass")]
        deadline = time.monotonic() + 20
        while np.abs(shown_picture(page, "#live-view")[200, 620].astype(int) - grass).max() >= 40:
            assert time.monotonic() < deadline, "the remap did not reach the live view"
            time.sleep(0.3)
        screenshot(page, "live.png")
        page.fill("#remap", "cheese=grass")
        page.click("#remap-form button")
        page.wait_for_selector("#remap-status.error")
        assert "cheese" in page.text_content("#remap-status")
    finally:
        page.click("nav button[data-view=doodle]")  # the page stops watching
        assert api(base, "DELETE", "/v1/streams/red")[0] == 200


def test_the_generator_picker_lists_the_bundled_generators_and_paints_with_the_one_picked(studio, vae_generator,
                                                                                         page):
    """Issue 40: the studio lists the generators it may use (the service's own first, then the
    bundled and installed ones by name) and repaints with the one picked: the service loads its
    set on first use; the canvas and palette follow its size and label set."""
    base, _ = studio
    start = open_studio(page, base)
    names = page.eval_on_selector_all("#generator option", "options => options.map(o => o.value)")
    assert names[0] == str(vae_generator) and {"default", "spade2"} <= set(names[1:]), names
    before = seq(page)
    page.select_option("#generator", "default")
    picked = settled(page, before)
    assert picked.shape == (256, 256, 3) and start.shape == (64, 64, 3)  # the student's size
    assert page.evaluate("document.querySelector('#canvas').width") == 256
    assert page.input_value("#generator") == "default"
    status, info = api(base, "GET", "/v1/labels?generator=default")
    assert status == 200 and info["size"] == [256, 256] and info["generator_name"] == "default"
    sky = np.full((256, 256), class_id("sky"), np.uint8)
    status, body, _ = post(base, "/v1/synthesize", {"labels": png_bytes(sky, "L")}, {"seed": 1, "generator": "default"})
    assert status == 200 and decode(body).shape == (256, 256, 3)
    assert error(post(base, "/v1/synthesize", {"labels": png_bytes(sky, "L")}, {"generator": "defualt"}))["status"] == 422
    assert error(post(base, "/v1/synthesize", {"labels": png_bytes(sky, "L")},
                      {"generator": "/etc/passwd"}))["status"] == 403  # names, or files under --media-root only
    before = seq(page)
    page.select_option("#generator", str(vae_generator))  # back to the service's own
    assert settled(page, before).shape == (64, 64, 3)
