"""Image validation and normalisation on a generated corpus of odd, bad and hostile images."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import pytest
from PIL import Image, ImageFile

from llamactl.server.images import ImageError, ImageLimits, decode_base64_image, decode_image
from tests.fixtures.images import corpus

LIMITS = ImageLimits(max_bytes=20_000_000, max_pixels=40_000_000)


def _refused(data: bytes, limits: ImageLimits = LIMITS) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, limits)
    return info.value


@pytest.mark.parametrize("sample", corpus.valid_samples(), ids=lambda s: s.name)
def test_valid_corpus_decodes_to_rgb(sample: corpus.Sample) -> None:
    im = decode_image(sample.data, LIMITS)
    assert im.mode == "RGB"
    assert im.width >= 1 and im.height >= 1
    im.tobytes()  # fully decoded, not a lazy handle on a closed buffer


@pytest.mark.parametrize("sample", corpus.bad_samples(), ids=lambda s: s.name)
def test_bad_corpus_gets_its_4xx_with_a_plain_message(sample: corpus.Sample) -> None:
    err = _refused(sample.data)
    assert err.status == sample.status
    assert err.message == str(err)
    # Plain words of ours: no Pillow internals, exception names or echoed input.
    for leak in (
        "PIL",
        "Error",
        "Traceback",
        "cannot identify",
        "broken",
        "decompression bomb",
        "<svg",
        "%PDF",
    ):
        assert leak not in err.message


def test_corpus_is_consistent_with_documented_limits() -> None:
    assert all(len(s.data) < corpus.MIN_MAX_BYTES for s in corpus.valid_samples())
    assert corpus.PHOTO_PIXELS <= LIMITS.max_pixels < corpus.BOMB_PIXELS
    names = [s.name for s in corpus.all_samples()]
    assert len(names) == len(set(names))


def _pixel(data: bytes, xy: tuple[int, int]) -> tuple[int, int, int]:
    px = decode_image(data, LIMITS).getpixel(xy)
    assert isinstance(px, tuple)
    return (int(px[0]), int(px[1]), int(px[2]))


def _close(a: tuple[int, int, int], b: tuple[int, int, int], tol: int = 40) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def test_exif_orientation_is_applied() -> None:
    im = decode_image(corpus.exif_rotated_jpeg(), LIMITS)
    assert im.size == (20, 40)  # stored 40x20, orientation 6
    top, bottom = im.getpixel((10, 5)), im.getpixel((10, 35))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert _close(tuple(top)[:3], (255, 0, 0)) and _close(tuple(bottom)[:3], (0, 0, 255))  # type: ignore[arg-type]


def test_alpha_is_composited_on_white() -> None:
    assert _pixel(corpus.rgba_png(), (2, 2)) == (255, 255, 255)
    assert _pixel(corpus.rgba_png(), (12, 2)) == (0, 200, 0)
    assert _pixel(corpus.la_png(), (2, 2)) == (255, 255, 255)
    assert _pixel(corpus.la_png(), (12, 2)) == (0, 0, 0)
    assert _pixel(corpus.palette_png_with_transparency(), (2, 2)) == (255, 255, 255)
    assert _pixel(corpus.palette_png_with_transparency(), (12, 2)) == (0, 0, 255)


def test_16bit_keeps_its_range_instead_of_clipping() -> None:
    im = decode_image(corpus.png_16bit(), LIMITS)
    row = [im.getpixel((x, 0)) for x in range(im.width)]
    assert row[0] == (0, 0, 0) and row[-1] == (255, 255, 255)
    assert 100 < row[len(row) // 2][0] < 160  # type: ignore[index]


def test_animated_gif_uses_first_frame_and_cmyk_is_converted() -> None:
    assert _close(_pixel(corpus.animated_gif(), (8, 8)), (255, 0, 0), tol=5)
    cmyk = next(s for s in corpus.valid_samples() if s.name == "cmyk.jpg")
    assert _close(_pixel(cmyk.data, (5, 5)), (255, 0, 0))


def test_photo_and_extreme_shapes_keep_their_size() -> None:
    sizes = {s.name: decode_image(s.data, LIMITS).size for s in corpus.valid_samples()}
    assert sizes["photo-4000x3000.jpg"] == corpus.PHOTO_SIZE
    assert sizes["very-wide-10000x3.png"] == (10_000, 3)
    assert sizes["1x1.png"] == (1, 1)


def test_bomb_is_refused_from_the_header_fast() -> None:
    bomb = corpus.png_bomb()
    assert len(bomb) < 100_000
    start = time.perf_counter()
    for _ in range(20):
        assert _refused(bomb).status == 413
    assert (time.perf_counter() - start) / 20 < 0.05  # a full decode would take seconds and ~1 GB


@pytest.fixture
def pillow_globals() -> Iterator[None]:
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    yield
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def test_our_pixel_limit_holds_without_pillows_global_limit(pillow_globals: None) -> None:
    Image.MAX_IMAGE_PIXELS = None  # someone else in the process disabled Pillow's check
    assert _refused(corpus.png_bomb()).status == 413
    assert _refused(corpus.png_claiming(100_000, 100_000)).status == 413
    err = _refused(corpus.png_claiming(7000, 7000))
    assert err.status == 413 and "7000x7000" in err.message and "40000000" in err.message


def test_truncated_images_fail_even_if_lenient_mode_was_turned_on(pillow_globals: None) -> None:
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    for name in ("truncated.jpg", "truncated.png"):
        sample = next(s for s in corpus.bad_samples() if s.name == name)
        assert _refused(sample.data).status == 400


def test_pixel_limit_is_inclusive() -> None:
    data = next(s.data for s in corpus.valid_samples() if s.name == "rgb.jpg")  # 64x48
    assert decode_image(data, ImageLimits(max_bytes=10_000, max_pixels=64 * 48)).size == (64, 48)
    assert _refused(data, ImageLimits(max_bytes=10_000, max_pixels=64 * 48 - 1)).status == 413


def test_byte_limit() -> None:
    sample = corpus.oversized_sample(5000)
    assert len(sample.data) > 5000
    err = _refused(sample.data, ImageLimits(max_bytes=5000, max_pixels=10_000))
    assert err.status == 413 and "5000-byte limit" in err.message
    assert decode_image(sample.data, ImageLimits(max_bytes=len(sample.data), max_pixels=100)).size == (4, 4)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ImageLimits(max_bytes=0, max_pixels=1)


# --- base64 -------------------------------------------------------------------------------------------------

PNG = next(s.data for s in corpus.valid_samples() if s.name == "rgba.png")
B64 = base64.b64encode(PNG).decode()


@pytest.mark.parametrize(
    "text",
    [
        B64,
        f"data:image/png;base64,{B64}",
        f"DATA:image/jpeg;BASE64,{B64}",  # the declared type is not trusted; the bytes decide
        f"data:image/png;charset=utf-8;base64,{B64}",
        "\n".join(B64[i : i + 76] for i in range(0, len(B64), 76)),  # MIME line breaks
        f"  {B64}\n",
        B64.rstrip("="),  # missing padding
    ],
)
def test_base64_forms_accepted(text: str) -> None:
    assert decode_base64_image(text, LIMITS).size == (16, 8)


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("", 400),
        ("data:image/png;base64,", 400),
        ("not base64 at all!", 400),
        (B64[:-8] + "!!!!" + B64[-4:], 400),
        ("A", 400),
        (f"data:image/png,{B64}", 400),  # not base64-encoded
        (base64.b64encode(b"hello world").decode(), 415),
        (base64.b64encode(b"\xff\xd8\xff\xe0garbage").decode(), 400),
    ],
)
def test_base64_garbage_refused(text: str, status: int) -> None:
    with pytest.raises(ImageError) as info:
        decode_base64_image(text, LIMITS)
    assert info.value.status == status


def test_base64_size_checked_before_decoding() -> None:
    limits = ImageLimits(max_bytes=len(PNG) - 1, max_pixels=1000)
    with pytest.raises(ImageError) as info:
        decode_base64_image("A" * 10_000_000, limits)  # would be 7.5 MB once decoded
    assert info.value.status == 413
    with pytest.raises(ImageError) as info:
        decode_base64_image(B64, limits)
    assert info.value.status == 413


def test_bomb_warning_raised_as_error_is_413(pillow_globals: None) -> None:
    import warnings

    Image.MAX_IMAGE_PIXELS = 1000  # the header check of Pillow now fires first, as a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        err = _refused(corpus.png_claiming(40, 40), ImageLimits(max_bytes=10_000, max_pixels=10_000))
    assert err.status == 413


def _big_png() -> tuple[bytes, str]:
    """A PNG whose base64 spans several of the decoder's 64 Ki-character pieces."""
    import io

    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    data = buf.getvalue()
    text = base64.b64encode(data).decode()
    assert len(text) > 3 * 65536
    return data, text


@pytest.mark.parametrize("form", ["plain", "mime", "unit separators", "no padding"])
def test_large_base64_decodes_as_in_one_piece(form: str) -> None:
    _, text = _big_png()
    if form == "mime":
        text = "\r\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    elif form == "unit separators":  # str's whitespace beyond the usual (the regex removes it too)
        text = "\x1f".join(text[i : i + 1000] for i in range(0, len(text), 1000))
    elif form == "no padding":
        text = text.rstrip("=")
    assert decode_base64_image(text, ImageLimits(max_bytes=10**7, max_pixels=10**6)).size == (300, 300)


def test_large_base64_with_padding_inside_is_refused() -> None:
    _, text = _big_png()
    cut = 65536  # a piece boundary: each piece alone would be valid
    broken = text[: cut - 4] + "QQ==" + text[cut:]
    with pytest.raises(ImageError) as info:
        decode_base64_image(broken, ImageLimits(max_bytes=10**7, max_pixels=10**6))
    assert info.value.status == 400 and "base64" in info.value.message
