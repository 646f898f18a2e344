"""load_image / load_images: every source kind, and how each kind of failure is reported."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from loopback import Loopback
from jaxvlm.vl import IMAGE_TOKEN, FetchPolicy, ImageLoadError, load_image, load_images


# ----------------------------------------------------------------------------- helpers

def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(width: int = 16, height: int = 12) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no data: a decompression-bomb stand-in."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int32)


PNG = encode(gradient())
BIG_BODY = encode(gradient(200, 200)) + b"\x00" * 200_000  # valid PNG followed by padding


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    # The loopback server must be reached directly even where the environment names a proxy.
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("JAXVLM_IMAGE_FETCH_TIMEOUT", raising=False)


# ----------------------------------------------------------------------------- loopback server

class Server(Loopback):
    def __init__(self):
        self.requests: list[tuple[str, dict]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def send_body(self, code: int, body: bytes, ctype: str, length: bool = True, extra=()):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                for key, value in extra:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def redirect(self, location: str, extra=()):
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                for key, value in extra:
                    self.send_header(key, value)
                self.end_headers()

            def do_GET(self):
                owner.requests.append((self.path, dict(self.headers)))
                path = self.path
                if path.startswith("/img.png"):
                    self.send_body(200, PNG, "image/png")
                elif path == "/octet":
                    self.send_body(200, PNG, "application/octet-stream")
                elif path == "/404":
                    self.send_body(404, b"not found", "text/plain")
                elif path == "/500":
                    self.send_body(500, b"boom", "text/plain")
                elif path == "/html":
                    self.send_body(200, b"<html><body>Not an image</body></html>", "text/html")
                elif path == "/empty":
                    self.send_body(200, b"", "image/png")
                elif path == "/truncated":
                    self.send_body(200, PNG[: len(PNG) // 2], "image/png")
                elif path == "/big-length":
                    self.send_body(200, BIG_BODY, "image/png")
                elif path == "/big-stream":  # no Content-Length: the size is only known while reading
                    self.send_body(200, BIG_BODY, "image/png", length=False)
                elif path == "/hang":
                    owner.stop.wait(20)
                elif path == "/drip":  # answers, then sends one byte at a time, forever
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    while not owner.stop.wait(0.1):
                        try:
                            self.wfile.write(b"\x00")
                            self.wfile.flush()
                        except OSError:
                            return
                elif path == "/loop":
                    self.redirect("/loop")
                elif path.startswith("/hop/"):
                    left = int(path.rsplit("/", 1)[1])
                    self.redirect("/img.png" if left == 0 else f"/hop/{left - 1}")
                elif path == "/to-ftp":
                    self.redirect("ftp://127.0.0.1/img.png")
                elif path == "/no-location":
                    self.send_body(302, b"", "text/plain")
                elif path == "/set-cookie":
                    self.redirect("/img.png?after-cookie", extra=[("Set-Cookie", "session=secret")])
                else:
                    self.send_body(404, b"", "text/plain")

        super().__init__(Handler)


@pytest.fixture(scope="module")
def server():
    srv = Server()
    yield srv
    srv.close()


# ----------------------------------------------------------------------------- source kinds

def test_image_token_value():
    assert IMAGE_TOKEN == "<IMAGE_TOKEN>"


def test_pil_image_is_converted_and_left_untouched():
    rgba = Image.new("RGBA", (3, 2), (10, 20, 30, 255))
    out = load_image(rgba)
    assert out.mode == "RGB" and out.size == (3, 2)
    assert out.getpixel((0, 0)) == (10, 20, 30)
    assert rgba.mode == "RGBA" and out is not rgba
    rgb = Image.new("RGB", (3, 2), (10, 20, 30))
    out = load_image(rgb)  # already upright RGB: still a copy, never the caller's image
    out.putpixel((0, 0), (0, 0, 0))
    assert out is not rgb and rgb.getpixel((0, 0)) == (10, 20, 30)


def test_local_path_str_and_pathlike(tmp_path):
    path = tmp_path / "pic.png"
    path.write_bytes(PNG)
    expected = pixels(gradient())
    for source in (str(path), path):
        out = load_image(source)
        assert out.mode == "RGB"
        np.testing.assert_array_equal(pixels(out), expected)


def test_file_url(tmp_path):
    path = tmp_path / "with space.png"
    path.write_bytes(PNG)
    url = path.as_uri()  # percent-encodes the space
    assert url.startswith("file:///") and "%20" in url
    np.testing.assert_array_equal(pixels(load_image(url)), pixels(gradient()))
    np.testing.assert_array_equal(pixels(load_image("file://localhost" + str(path))), pixels(gradient()))


def test_data_url():
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    np.testing.assert_array_equal(pixels(load_image(url)), pixels(gradient()))
    wrapped = "data:image/png;base64," + base64.encodebytes(PNG).decode()  # line-wrapped base64
    np.testing.assert_array_equal(pixels(load_image(wrapped)), pixels(gradient()))


def test_http_url(server):
    np.testing.assert_array_equal(pixels(load_image(server.base + "/img.png")), pixels(gradient()))
    # The body decides, not the content type.
    np.testing.assert_array_equal(pixels(load_image(server.base + "/octet")), pixels(gradient()))


def test_redirects_within_the_cap_are_followed(server):
    out = load_image(server.base + "/hop/3")
    np.testing.assert_array_equal(pixels(out), pixels(gradient()))


def test_no_credentials_or_cookies_are_sent(server):
    load_image(server.base + "/set-cookie")
    followed = [headers for path, headers in server.requests if path == "/img.png?after-cookie"]
    assert followed, "the redirect after Set-Cookie was not followed"
    for path, headers in server.requests:
        lowered = {k.lower() for k in headers}
        assert "cookie" not in lowered and "authorization" not in lowered, path
    with pytest.raises(ImageLoadError, match="credentials"):
        load_image(server.base.replace("http://", "http://user:secret@") + "/img.png")


# ----------------------------------------------------------------------------- HTTP failures

def expect_error(source, *fragments, **kw) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(source, **kw)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in message, message
    return info.value


def test_http_404_and_500(server):
    for code in ("404", "500"):
        url = f"{server.base}/{code}"
        err = expect_error(url, url, f"HTTP {code}")
        assert err.source == url


def test_url_that_never_answers_times_out(server):
    url = server.base + "/hang"
    start = time.monotonic()
    expect_error(url, url, "timed out", timeout=1.0)
    assert time.monotonic() - start < 4.0


def test_timeout_from_environment(server, monkeypatch):
    monkeypatch.setenv("JAXVLM_IMAGE_FETCH_TIMEOUT", "0.5")
    start = time.monotonic()
    expect_error(server.base + "/hang", "timed out after 0.5 s")
    assert time.monotonic() - start < 3.0
    monkeypatch.setenv("JAXVLM_IMAGE_FETCH_TIMEOUT", "soon")
    expect_error(server.base + "/img.png", "JAXVLM_IMAGE_FETCH_TIMEOUT")


def test_slow_drip_is_bounded_by_the_deadline(server):
    url = server.base + "/drip"
    start = time.monotonic()
    expect_error(url, url, "timed out", timeout=1.0)
    assert time.monotonic() - start < 4.0


def test_redirect_loop_and_too_many_redirects(server):
    expect_error(server.base + "/loop", server.base + "/loop", "redirect loop")
    expect_error(server.base + "/hop/7", "too many redirects")
    expect_error(server.base + "/hop/2", "too many redirects", policy=FetchPolicy(max_redirects=1))
    expect_error(server.base + "/no-location", "without a Location")


def test_redirect_to_another_scheme_is_refused(server):
    expect_error(server.base + "/to-ftp", "unsupported URL scheme 'ftp'")


def test_html_body(server):
    expect_error(server.base + "/html", server.base + "/html", "not a recognised image", "text/html")


def test_empty_and_truncated_bodies(server):
    expect_error(server.base + "/empty", "empty response body")
    expect_error(server.base + "/truncated", server.base + "/truncated")


def test_body_larger_than_the_cap(server):
    policy = FetchPolicy(max_bytes=100_000)
    expect_error(server.base + "/big-length", "larger than the cap of 100000 bytes", policy=policy)
    expect_error(server.base + "/big-stream", "larger than the cap of 100000 bytes", policy=policy)
    assert load_image(server.base + "/big-length").size == (200, 200)  # fine under the default cap


def test_policy_domains_and_private_addresses(server):
    url = server.base + "/img.png"
    expect_error(url, "not in the allowed domains", policy=FetchPolicy(allowed_domains=("example.com",)))
    assert load_image(url, policy=FetchPolicy(allowed_domains=("127.0.0.1",))).size == (16, 12)
    expect_error(url, "non-public address 127.0.0.1", policy=FetchPolicy(block_private=True))


def test_policy_validation():
    for bad in (dict(timeout=0), dict(max_bytes=0), dict(max_redirects=-1), dict(max_pixels=1.5),
                dict(allowed_domains=("",))):
        with pytest.raises(ValueError):
            FetchPolicy(**bad)
    assert FetchPolicy(allowed_domains="Example.COM").allowed_domains == ("example.com",)


def test_unsupported_schemes():
    for url in ("ftp://example.com/a.png", "gopher://example.com/a.png"):
        expect_error(url, url, "unsupported URL scheme")


# ----------------------------------------------------------------------------- local failures

def test_nonexistent_path_and_directory(tmp_path):
    missing = str(tmp_path / "missing.png")
    expect_error(missing, missing, "no such file")
    expect_error(str(tmp_path), str(tmp_path), "is a directory")


def test_zero_byte_and_non_image_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    expect_error(str(empty), str(empty), "empty file")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    expect_error(str(text), str(text), "not a recognised image")
    # PIL would run Ghostscript to decode PostScript; refused before decoding.
    eps = tmp_path / "drawing.eps"
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    expect_error(str(eps), str(eps), "PostScript")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_fail(tmp_path, fmt):
    data = encode(gradient(64, 64), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) * 2 // 3])
    expect_error(str(path), str(path), "truncated")


def test_local_files_can_be_turned_off(tmp_path):
    path = tmp_path / "pic.png"
    path.write_bytes(PNG)
    policy = FetchPolicy(allow_local_files=False)
    expect_error(str(path), "not allowed", policy=policy)
    expect_error(path.as_uri(), "not allowed", policy=policy)


def test_remote_file_url():
    expect_error("file://otherhost/etc/x.png", "remote host")


@pytest.mark.parametrize("url, cause", [
    ("data:image/png;base64,@@not-base64@@", "invalid base64"),
    ("data:image/png;base64", "no ','"),
    ("data:text/plain;base64,aGVsbG8=", "image/*"),
    ("data:image/png," + "A" * 100, "base64-encoded"),
    ("data:image/png;base64,", "empty payload"),
    ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "not a recognised image"),
])
def test_malformed_data_urls(url, cause):
    err = expect_error(url, cause)
    # The message names the source by a short prefix, never the whole payload.
    assert url[:20] in str(err)
    assert len(err.source) <= 60


def test_data_url_over_the_cap():
    url = "data:image/png;base64," + base64.b64encode(BIG_BODY).decode()
    expect_error(url, "larger than the cap", policy=FetchPolicy(max_bytes=10_000))


def test_bad_arguments():
    expect_error(12345, "unsupported source type")
    expect_error("", "empty string")
    expect_error(str(Path(__file__)), "not a recognised image")
    with pytest.raises(ImageLoadError, match="positive number"):
        load_image("http://127.0.0.1:9/x.png", timeout=-1)


# ----------------------------------------------------------------------------- decoding

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs(tmp_path):
    # Above PIL's limit, where PIL itself only warns: refused.
    warn_sized = tmp_path / "bomb-warn.png"
    warn_sized.write_bytes(png_header_only(10_000, 10_000))
    expect_error(str(warn_sized), "decompression bomb", "10000x10000")
    # Above twice the limit, where PIL raises: still our error class.
    error_sized = tmp_path / "bomb-error.png"
    error_sized.write_bytes(png_header_only(20_000, 20_000))
    expect_error(str(error_sized), str(error_sized), "decompression bomb")
    # A policy cap below PIL's.
    ok = tmp_path / "ok.png"
    ok.write_bytes(encode(gradient(100, 100)))
    expect_error(str(ok), "exceeds the cap of 5000", policy=FetchPolicy(max_pixels=5000))
    expect_error(Image.new("RGB", (100, 100)), "exceeds the cap", policy=FetchPolicy(max_pixels=5000))


def test_extreme_sizes(tmp_path):
    one = tmp_path / "one.png"
    one.write_bytes(encode(Image.new("RGB", (1, 1), (7, 8, 9))))
    out = load_image(str(one))
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (7, 8, 9)
    wide = tmp_path / "wide.png"
    wide.write_bytes(encode(gradient(10_000, 50)))
    out = load_image(str(wide))
    assert out.size == (10_000, 50) and out.mode == "RGB"
    np.testing.assert_array_equal(pixels(out), pixels(gradient(10_000, 50)))


def test_animated_gif_gives_the_first_frame(tmp_path):
    red, blue = Image.new("RGB", (6, 4), (255, 0, 0)), Image.new("RGB", (6, 4), (0, 0, 255))
    path = tmp_path / "anim.gif"
    red.save(path, save_all=True, append_images=[blue], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 2
    out = load_image(str(path))
    assert out.mode == "RGB" and out.size == (6, 4)
    assert set(map(tuple, pixels(out).reshape(-1, 3))) == {(255, 0, 0)}


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, "JPEG", quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
        reference = check.convert("RGB")
    out = load_image(str(path))
    assert out.mode == "RGB"
    np.testing.assert_array_equal(pixels(out), pixels(reference))
    assert np.abs(pixels(out)[0, 0] - [255, 0, 0]).max() <= 20  # red


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 10, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    out = load_image(str(path))
    assert out.mode == "RGB"
    np.testing.assert_array_equal(pixels(out)[0, :, 0], [0, 10, 128, 255])
    np.testing.assert_array_equal(pixels(out)[..., 0], pixels(out)[..., 2])


def test_exif_orientation_is_applied(tmp_path):
    base = Image.new("RGB", (4, 2), (0, 0, 255))
    base.putpixel((0, 0), (255, 0, 0))  # a red top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = tmp_path / "rotated.png"
    base.save(path, exif=exif.tobytes())
    out = load_image(str(path))
    assert out.size == (2, 4)
    with Image.open(path) as check:
        reference = ImageOps.exif_transpose(check).convert("RGB")
    np.testing.assert_array_equal(pixels(out), pixels(reference))
    assert out.getpixel((1, 0)) == (255, 0, 0)  # the corner moved to the top right


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))      # fully transparent red
    rgba.putpixel((1, 0), (0, 0, 0, 128))      # half-transparent black
    out = load_image(rgba)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((1, 0)))
    la = Image.new("LA", (1, 1), (0, 0))
    assert load_image(la).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    path = tmp_path / "transparent.gif"
    palette.save(path, transparency=0)
    out = load_image(str(path))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 255, 0)


def test_grey_and_bilevel_modes():
    assert load_image(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert load_image(Image.new("1", (2, 2), 1)).getpixel((1, 1)) == (255, 255, 255)


# ----------------------------------------------------------------------------- many at once

def test_load_images_keeps_order_and_returns_failures_in_place(server, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(PNG)
    sources = [str(good), server.base + "/404", Image.new("RGB", (2, 2)), str(tmp_path / "nope.png"),
               server.base + "/img.png"]
    results = load_images(sources, max_workers=3)
    assert [type(r).__name__ for r in results] == ["Image", "ImageLoadError", "Image", "ImageLoadError", "Image"]
    assert server.base + "/404" in str(results[1])
    assert results[2].size == (2, 2)
    assert load_images([]) == []
    with pytest.raises(ValueError):
        load_images([str(good)], max_workers=0)


def test_load_images_runs_concurrently(server):
    start = time.monotonic()
    results = load_images([server.base + "/hang"] * 4, max_workers=4, timeout=1.0)
    assert all(isinstance(r, ImageLoadError) for r in results)
    assert time.monotonic() - start < 3.5  # four 1-second timeouts side by side, not one after another
