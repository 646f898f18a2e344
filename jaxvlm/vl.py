"""Image loading for prompts: PIL images, paths, file://, http(s):// and data: URLs.

Every failure is an :class:`ImageLoadError` (a ``ValueError``) whose message holds the source
(the path or URL verbatim; a short prefix for data URLs) and the cause.

Decisions, each made so that the model sees what the user meant:

* Images are decoded fully here (``Image.load()``), so a truncated file fails now rather than
  being padded with grey later. Note: PIL skips that check when some other code has set
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`` process-wide (LMDeploy does so on import);
  we warn once when we see it, but cannot undo a global another library relies on.
* EXIF orientation is applied (``ImageOps.exif_transpose``), as transformers' ``load_image``
  does, so a phone photo is seen upright. This is also done for PIL images passed in.
* Transparency (RGBA, LA, PA, P or L/RGB with a ``transparency`` key) is composited onto WHITE,
  as transformers' ``convert_to_rgb`` does for llava-hf processors; the original LLaVA's
  ``convert('RGB')`` drops alpha instead, which turns transparent pixels into whatever colour
  they happen to store (often black).
* 16-bit greyscale (``I;16*`` and ``I``, the mode older Pillow gives 16-bit PNGs) is scaled to
  8 bits (``v / 257``, so 65535 -> 255); PIL's own conversion clips it to 255 instead.
* Animated images (GIF, APNG, WebP): the first frame.
* Network fetches use urllib from the standard library with: a timeout (default 10 s, env
  ``JAXVLM_IMAGE_FETCH_TIMEOUT``) that bounds each socket operation and, as a deadline checked
  between reads, the whole fetch; a byte cap; at most a few redirects, each checked like the
  first URL; no cookies, no auth handlers, and URLs carrying ``user:password@`` are refused.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from typing import IO, Sequence, Union

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

__all__ = [
    "IMAGE_TOKEN",
    "DEFAULT_FETCH_POLICY",
    "FetchPolicy",
    "ImageLoadError",
    "ImageSource",
    "load_image",
    "load_images",
]

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<IMAGE_TOKEN>"
"""Placeholder in prompt text that marks where an image's tokens go."""

ImageSource = Union[Image.Image, str, os.PathLike]

TIMEOUT_ENV = "JAXVLM_IMAGE_FETCH_TIMEOUT"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_REDIRECTS = 5
# PIL's own default limit; above it PIL only warns (and errors at twice it), we refuse.
DEFAULT_MAX_PIXELS = 89_478_485

_DATA_PREFIX_LEN = 48
_CHUNK = 64 * 1024
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_USER_AGENT = "jaxvlm-image-fetch/0.1 (python urllib)"
_URL_WITH_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


class ImageLoadError(ValueError):
    """An image could not be loaded; ``source`` names it and ``cause`` says why."""

    def __init__(self, source: str, cause: str):
        super().__init__(f"cannot load image {source}: {cause}")
        self.source = source
        self.cause = cause


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for :func:`load_image`.

    timeout: seconds for network fetches; None reads ``JAXVLM_IMAGE_FETCH_TIMEOUT`` (default 10).
    max_bytes: cap on an image's encoded size (downloads and data URLs).
    max_redirects: how many HTTP redirects are followed.
    max_pixels: cap on width * height of a decoded image (decompression bombs).
    allowed_domains: if set, http(s) hosts must be one of these or a subdomain of one.
    block_private: refuse hosts that resolve to non-global addresses (loopback, private, link-local);
        checked before each request, so a DNS answer that changes in between is not caught.
    allow_local_files: accept local paths and file:// URLs (turn off when sources are untrusted).
    """

    timeout: float | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    max_pixels: int = DEFAULT_MAX_PIXELS
    allowed_domains: tuple[str, ...] | None = None
    block_private: bool = False
    allow_local_files: bool = True

    def __post_init__(self) -> None:
        if self.timeout is not None and not _is_positive_number(self.timeout):
            raise ValueError(f"FetchPolicy.timeout must be a positive number, got {self.timeout!r}")
        for name in ("max_bytes", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"FetchPolicy.{name} must be a positive int, got {value!r}")
        if (not isinstance(self.max_redirects, int) or isinstance(self.max_redirects, bool)
                or self.max_redirects < 0):
            raise ValueError(f"FetchPolicy.max_redirects must be an int >= 0, got {self.max_redirects!r}")
        if self.allowed_domains is not None:
            domains = (self.allowed_domains,) if isinstance(self.allowed_domains, str) else self.allowed_domains
            if not all(isinstance(d, str) and d for d in domains):
                raise ValueError(f"FetchPolicy.allowed_domains must be host names, got {self.allowed_domains!r}")
            # Frozen dataclass: normalise through object.__setattr__.
            object.__setattr__(self, "allowed_domains", tuple(d.lower().strip(".") for d in domains))


DEFAULT_FETCH_POLICY = FetchPolicy()
"""Used when no policy is passed; replace it to change the process-wide defaults."""


def load_image(source: ImageSource, timeout: float | None = None, *,
               policy: FetchPolicy | None = None) -> Image.Image:
    """Load ``source`` as a fully decoded RGB PIL image, or raise :class:`ImageLoadError`.

    ``timeout`` (seconds) overrides the policy's and the environment's timeout for this call.
    """
    policy = DEFAULT_FETCH_POLICY if policy is None else policy
    label = _describe(source)
    try:
        if isinstance(source, Image.Image):
            # The caller's image: keep the frame it is on and never seek or close it.
            return _finish(source, policy, first_frame=False)
        if isinstance(source, os.PathLike):
            source = os.fspath(source)
        if not isinstance(source, str):
            raise _Failure(f"unsupported source type {type(source).__name__}; expected a PIL image, "
                           "a path, or a file://, http(s):// or data:image/... URL")
        return _load_string(source, timeout, policy)
    except ImageLoadError:
        raise
    except _Failure as exc:
        raise ImageLoadError(label, str(exc)) from exc.__cause__
    except Exception as exc:  # decoders raise OSError, SyntaxError, struct.error, zlib.error, ...
        raise ImageLoadError(label, f"{type(exc).__name__}: {exc}") from exc


def load_images(sources: Sequence[ImageSource], max_workers: int = 8, timeout: float | None = None, *,
                policy: FetchPolicy | None = None) -> list[Image.Image | Exception]:
    """Load many images concurrently; each failure is returned in its place, not raised."""
    if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < 1:
        raise ValueError(f"max_workers must be an int >= 1, got {max_workers!r}")
    sources = list(sources)
    if not sources:
        return []

    def one(src: ImageSource) -> Image.Image | Exception:
        try:
            return load_image(src, timeout, policy=policy)
        except Exception as exc:  # one bad image must not fail the others
            return exc

    with ThreadPoolExecutor(max_workers=min(max_workers, len(sources)),
                            thread_name_prefix="jaxvlm-load-image") as pool:
        return list(pool.map(one, sources))


class _Failure(Exception):
    """Internal: a cause message, wrapped into ImageLoadError with the source label."""


def _is_positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and value == value


def _describe(source: object) -> str:
    if isinstance(source, Image.Image):
        return f"<PIL image mode={source.mode} size={source.size[0]}x{source.size[1]}>"
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if source[:5].lower() == "data:" and len(source) > _DATA_PREFIX_LEN:
            return source[:_DATA_PREFIX_LEN] + "..."
        return source
    return f"<{type(source).__name__}>"


def _load_string(source: str, timeout: float | None, policy: FetchPolicy) -> Image.Image:
    if not source:
        raise _Failure("empty string")
    if source[:5].lower() == "data:":
        return _decode_bytes(_parse_data_url(source, policy), policy)
    match = _URL_WITH_SCHEME.match(source)
    if match is None:
        return _load_path(os.path.expanduser(source), policy)
    scheme = match.group(1).lower()
    if scheme in ("http", "https"):
        data, content_type = _fetch(source, _resolve_timeout(timeout, policy), policy)
        try:
            return _decode_bytes(data, policy)
        except _Failure as exc:
            raise _Failure(f"{exc} (content-type {content_type or 'not given'})") from exc.__cause__
    if scheme == "file":
        return _load_path(_file_url_to_path(source), policy)
    raise _Failure(f"unsupported URL scheme {scheme!r}; expected http, https, file or data")


def _resolve_timeout(timeout: float | None, policy: FetchPolicy) -> float:
    if timeout is not None:
        if not _is_positive_number(timeout):
            raise _Failure(f"timeout must be a positive number of seconds, got {timeout!r}")
        return float(timeout)
    if policy.timeout is not None:
        return float(policy.timeout)
    env = os.environ.get(TIMEOUT_ENV)
    if env is None or not env.strip():
        return DEFAULT_TIMEOUT_S
    try:
        value = float(env)
    except ValueError:
        value = -1.0
    if not _is_positive_number(value):
        raise _Failure(f"{TIMEOUT_ENV}={env!r} is not a positive number of seconds")
    return value


# ----------------------------------------------------------------------------- local files

def _file_url_to_path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise _Failure(f"file URL names a remote host {parts.netloc!r}")
    return urllib.request.url2pathname(parts.path)


def _load_path(path: str, policy: FetchPolicy) -> Image.Image:
    if not policy.allow_local_files:
        raise _Failure("local files are not allowed by the fetch policy")
    if not os.path.exists(path):
        raise _Failure("no such file")
    if os.path.isdir(path):
        raise _Failure("is a directory, not an image file")
    if os.path.getsize(path) == 0:
        raise _Failure("empty file (0 bytes)")
    try:
        with open(path, "rb") as fp:
            return _decode(fp, policy)
    except PermissionError as exc:
        raise _Failure(f"permission denied: {exc}") from exc


# ----------------------------------------------------------------------------- data URLs

def _parse_data_url(url: str, policy: FetchPolicy) -> bytes:
    head, comma, payload = url[5:].partition(",")
    if not comma:
        raise _Failure("malformed data URL: no ',' before the payload")
    params = [p.strip() for p in head.split(";")]
    media_type = params[0].lower()
    if not media_type.startswith("image/"):
        raise _Failure(f"data URL media type must be image/*, got {media_type or 'none'!r}")
    if "base64" not in (p.lower() for p in params[1:]):
        raise _Failure("data URL must be base64-encoded (';base64,')")
    payload = urllib.parse.unquote(payload)
    payload = "".join(payload.split())  # base64 in the wild is often line-wrapped
    # Decoded size is 3/4 of the text; refuse before decoding a huge payload.
    if len(payload) // 4 * 3 > policy.max_bytes:
        raise _Failure(f"data URL payload larger than the cap of {policy.max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _Failure(f"malformed data URL: invalid base64 ({exc})") from exc
    if not data:
        raise _Failure("data URL has an empty payload")
    return data


# ----------------------------------------------------------------------------- HTTP(S)

def _fetch(url: str, timeout: float, policy: FetchPolicy) -> tuple[bytes, str]:
    """GET ``url`` following redirects by hand, so each hop is checked; returns (body, content-type)."""
    deadline = time.monotonic() + timeout
    # Only these handlers: no cookies, no auth, no redirect following, no error raising
    # (status codes are handled below). Proxies from the environment are honoured.
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler()):
        opener.add_handler(handler)
    seen = {url}
    current = url
    for _ in range(policy.max_redirects + 1):
        _check_url(current, policy)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Failure(f"timed out after {timeout:g} s")
        request = urllib.request.Request(current, headers={"User-Agent": _USER_AGENT,
                                                           "Accept": "image/*,*/*;q=0.5"})
        try:
            response = opener.open(request, timeout=remaining)
        except (socket.timeout, TimeoutError) as exc:
            raise _Failure(f"timed out after {timeout:g} s") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (socket.timeout, TimeoutError)):
                raise _Failure(f"timed out after {timeout:g} s") from exc
            raise _Failure(f"cannot connect: {exc.reason}") from exc
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise _Failure(f"request failed: {type(exc).__name__}: {exc}") from exc
        if response is None:
            raise _Failure("no handler for this URL")
        with response:
            status = response.status
            if status in _REDIRECT_CODES:
                location = response.headers.get("Location")
                if not location:
                    raise _Failure(f"HTTP {status} redirect without a Location header")
                target = urllib.parse.urljoin(current, location)
                if target in seen:
                    raise _Failure(f"redirect loop at {target}")
                seen.add(target)
                current = target
                continue
            if status not in (200, 203):
                raise _Failure(f"HTTP {status} {response.reason}".rstrip())
            body = _read_body(response, policy.max_bytes, deadline, timeout)
            return body, response.headers.get("Content-Type", "")
    raise _Failure(f"too many redirects (more than {policy.max_redirects})")


def _read_body(response, max_bytes: int, deadline: float, timeout: float) -> bytes:
    length = response.headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise _Failure(f"body of {int(length)} bytes is larger than the cap of {max_bytes} bytes")
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            if time.monotonic() > deadline:
                raise _Failure(f"timed out after {timeout:g} s while reading the body")
            # read1: whatever has arrived (one socket read), so a server that drips bytes
            # cannot hold us inside one read past the deadline.
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise _Failure(f"body larger than the cap of {max_bytes} bytes")
            chunks.append(chunk)
    except (socket.timeout, TimeoutError) as exc:
        raise _Failure(f"timed out after {timeout:g} s while reading the body") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _Failure(f"connection failed while reading the body: {type(exc).__name__}: {exc}") from exc
    if not chunks:
        raise _Failure("empty response body")
    return b"".join(chunks)


def _check_url(url: str, policy: FetchPolicy) -> None:
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        parts.port  # raises ValueError on a malformed port
    except ValueError as exc:
        raise _Failure(f"malformed URL ({exc})") from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise _Failure(f"unsupported URL scheme {parts.scheme!r} (in {url}); only http and https are fetched")
    if not host:
        raise _Failure(f"URL has no host ({url})")
    if parts.username is not None or parts.password is not None:
        raise _Failure("URLs carrying credentials (user:password@) are refused; credentials are never sent")
    host = host.lower().rstrip(".")
    if policy.allowed_domains is not None and not any(
            host == d or host.endswith("." + d) for d in policy.allowed_domains):
        raise _Failure(f"host {host!r} is not in the allowed domains {list(policy.allowed_domains)}")
    if policy.block_private:
        try:
            infos = socket.getaddrinfo(host, None)
        except socket.gaierror as exc:
            raise _Failure(f"cannot resolve host {host!r}: {exc}") from exc
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%")[0])
            if not address.is_global:
                raise _Failure(f"host {host!r} resolves to the non-public address {address}, "
                               "refused by the fetch policy")


# ----------------------------------------------------------------------------- decoding

_warned_truncated = False


def _decode_bytes(data: bytes, policy: FetchPolicy) -> Image.Image:
    if len(data) > policy.max_bytes:
        raise _Failure(f"{len(data)} bytes is larger than the cap of {policy.max_bytes} bytes")
    return _decode(BytesIO(data), policy)


def _decode(fp: IO[bytes], policy: FetchPolicy) -> Image.Image:
    try:
        image = Image.open(fp)
    except Image.UnidentifiedImageError as exc:
        raise _Failure("not a recognised image format") from exc
    except Image.DecompressionBombError as exc:
        raise _Failure(f"decompression bomb refused: {exc}") from exc
    with image:
        if image.format == "EPS":
            # PIL decodes PostScript by running Ghostscript: not for images from prompts.
            raise _Failure("PostScript (EPS) images are not decoded")
        return _finish(image, policy)


def _finish(image: Image.Image, policy: FetchPolicy, first_frame: bool = True) -> Image.Image:
    """Check the pixel cap, decode fully, apply EXIF orientation and convert to RGB."""
    global _warned_truncated
    width, height = image.size
    if width <= 0 or height <= 0:
        raise _Failure(f"image has no pixels ({width}x{height})")
    if width * height > policy.max_pixels:
        raise _Failure(f"decompression bomb refused: {width}x{height} = {width * height} pixels "
                       f"exceeds the cap of {policy.max_pixels}")
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated:
        _warned_truncated = True
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, so truncated "
                       "images cannot be detected")
    if first_frame and getattr(image, "is_animated", False):
        image.seek(0)
    image.load()
    try:
        # exif_transpose copies an image that needs no turn; _to_rgb below copies it anyway.
        turn = image.getexif().get(ExifTags.Base.Orientation, 1) != 1
        upright = ImageOps.exif_transpose(image) if turn else image
    except Exception as exc:  # a corrupt EXIF block should not lose a readable image
        logger.warning("ignoring unreadable EXIF orientation: %s", exc)
        upright = image
    return _to_rgb(upright if upright is not None else image)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale: scale to 8 bits instead of PIL's clipping at 255.
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
