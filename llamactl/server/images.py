"""Untrusted image bytes -> a plain RGB ``PIL.Image``, or an ``ImageError`` with an HTTP status.

Order matters for safety: size in bytes first, then the format from magic bytes, then the dimensions from the
header (``Image.open`` is lazy), and only then a full decode. So a 100000x100000 PNG header or a tiny,
highly compressed bomb is refused in microseconds without allocating its pixels. Messages are written here and
never include Pillow's own text (which can echo paths, internals or attacker-controlled bytes).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps

# Formats we decode (Pillow plugin names; multi-picture JPEG "MPO" comes through the JPEG plugin). TIFF is
# allowed (scanners, microscopy); only the first page or frame of any format is used.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
ALLOWED_NAMES = "JPEG, PNG, GIF, WebP, BMP or TIFF"

_MAGIC: tuple[tuple[bytes, int, str], ...] = (  # (signature, offset, name)
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"WEBP", 8, "WEBP"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
)
# Recognised but refused, named in the 415 message so the client learns what it actually sent.
_KNOWN_OTHER: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML or SVG"),
    (b"<!doctype html", "HTML"),
    (b"<html", "HTML"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)
_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class ImageLimits:
    """Per-image limits: encoded size in bytes and width x height in pixels (both inclusive)."""

    max_bytes: int
    max_pixels: int

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError("image limits must be positive")


class ImageError(Exception):
    """A bad image: ``status`` is 400 (malformed), 413 (too large) or 415 (unsupported format)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_base64_image(s: str, limits: ImageLimits) -> Image.Image:
    """Decode base64 text, optionally a ``data:image/...;base64,`` URL, then the image (see ``decode_image``)."""
    text = s.strip()
    match = _DATA_URL.match(text[:256])
    if match:
        if ";base64" not in match.group(2).lower():
            raise ImageError(400, "image data URL must be base64-encoded (data:image/...;base64,...)")
        text = text[match.end() :]
    if _has_whitespace(text):
        text = _WHITESPACE.sub("", text)  # MIME-style line breaks are harmless
    # Refuse before decoding: base64 carries 3 bytes per 4 characters.
    if len(text) > (limits.max_bytes + 2) // 3 * 4:
        raise ImageError(413, f"image is larger than the {limits.max_bytes}-byte limit")
    if not text:
        raise ImageError(400, "image is empty")
    if len(text) % 4 == 1:
        raise ImageError(400, "image is not valid base64")
    text += "=" * (-len(text) % 4)  # tolerate missing padding
    try:
        data = _b64decode(text)
    except (binascii.Error, ValueError):
        raise ImageError(400, "image is not valid base64") from None
    return decode_image(data, limits)


_ORIENTATION = 0x0112  # the EXIF tag
_ASCII_WHITESPACE = (" ", "\n", "\r", "\t", "\f", "\v", "\x1c", "\x1d", "\x1e", "\x1f")  # str's \s in ASCII
_B64_PIECE = 1 << 16  # characters (a multiple of 4)


def _has_whitespace(text: str) -> bool:
    """Whether ``_WHITESPACE`` would remove anything: for ASCII text a few substring searches, each a short C
    call, where the regex holds the GIL for its whole pass (~1 ms for a 1120x1120 JPEG's base64)."""
    if not text.isascii():
        return _WHITESPACE.search(text) is not None
    return any(ws in text for ws in _ASCII_WHITESPACE)


def _b64decode(text: str) -> bytes:
    """Strict base64 in pieces of 64 Ki characters: the decoder holds the GIL throughout a call, so a whole
    upload in one call (~0.3 ms for 210 KB) stalls every other thread's Python, the model thread's kernel
    launches among them; between pieces they get their turn."""
    if len(text) <= _B64_PIECE:
        return base64.b64decode(text, validate=True)
    if "=" in text[: len(text) - 2]:  # padding inside: one call would refuse it, and so do the pieces
        raise binascii.Error("padding before the end")
    return b"".join(base64.b64decode(text[i : i + _B64_PIECE], validate=True)
                    for i in range(0, len(text), _B64_PIECE))


def sniff_format(data: bytes) -> str | None:
    """The allowed format ``data`` claims by its magic bytes, or None."""
    for signature, offset, name in _MAGIC:
        if data[offset : offset + len(signature)] == signature:
            if name == "WEBP" and not data.startswith(b"RIFF"):
                continue
            return name
    return None


def _describe_unsupported(data: bytes) -> str:
    head = data[:64].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for signature, name in _KNOWN_OTHER:
        if head.startswith(signature.lower()):
            return f"unsupported image format ({name}); send {ALLOWED_NAMES}"
    if b"<svg" in data[:1024].lower():
        return f"unsupported image format (SVG); send {ALLOWED_NAMES}"
    return f"unsupported or unrecognised image format; send {ALLOWED_NAMES}"


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode untrusted bytes into an RGB image, EXIF orientation applied, alpha composited on white."""
    if not data:
        raise ImageError(400, "image is empty")
    if len(data) > limits.max_bytes:
        raise ImageError(413, f"image is {len(data)} bytes, more than the {limits.max_bytes}-byte limit")
    if sniff_format(data) is None:
        raise ImageError(415, _describe_unsupported(data))
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # reads the header only
        width, height = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's process-wide limit
        # (the warning arrives as an exception when the process runs with warnings as errors)
        raise ImageError(413, f"image has more than the {limits.max_pixels}-pixel limit") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for bad headers; none of their text is shown
        raise ImageError(400, "image is corrupt or truncated") from None
    if width <= 0 or height <= 0:
        raise ImageError(400, "image has no pixels")
    if width * height > limits.max_pixels:
        raise ImageError(
            413,
            f"image is {width}x{height} ({width * height} pixels), more than the {limits.max_pixels}-pixel limit",
        )
    try:
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            # Someone in the process turned on Pillow's lenient mode; a half-grey truncated upload must still fail.
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        im.load()  # first frame / page only
    except Image.DecompressionBombError:
        raise ImageError(413, f"image has more than the {limits.max_pixels}-pixel limit") from None
    except MemoryError:
        raise ImageError(413, "image is too large to decode") from None
    except Exception:  # noqa: BLE001 - decoder errors of every kind mean bad data
        raise ImageError(400, "image is corrupt or truncated") from None
    try:
        rgb = to_rgb(_oriented(im))
    except MemoryError:
        im.close()
        raise ImageError(413, "image is too large to decode") from None
    except Exception:  # noqa: BLE001 - a colour mode Pillow cannot convert (e.g. LAB)
        im.close()
        raise ImageError(415, f"unsupported image colour mode ({im.mode})") from None
    if rgb is not im:
        im.close()
    return rgb


def _oriented(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block is ignored rather than failing a good photo. An upright
    image is returned as it is (exif_transpose would copy it: ~5 MB for 1120x1120)."""
    try:
        if im.getexif().get(_ORIENTATION, 1) == 1:
            return im
        return ImageOps.exif_transpose(im) or im
    except Exception:  # noqa: BLE001
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB: alpha over white, 16-bit/32-bit/float scaled, CMYK, palette, 1-bit."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(im)
    has_alpha = (
        mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or (mode == "P" and "transparency" in im.info)
        or (mode in ("L", "RGB", "1") and "transparency" in im.info)
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit ("I;16*", "I") and float ("F") greyscale to 8 bits, keeping contrast instead of clipping."""
    import numpy as np

    arr = np.asarray(im)
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        out = np.clip(arr * scale, 0, 255)
    else:
        arr = arr.astype(np.int64)
        out = np.clip(arr // 257 if arr.max(initial=0) > 255 else arr, 0, 255)
    return Image.fromarray(out.astype(np.uint8)).convert("RGB")
