"""Whatever a client sends: a clear 4xx JSON error or a normal answer, and the service stays up.

Limits of the test application (conftest): 8 files, 2,000,000 bytes per file, 6,000,000 per request.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests import images
from tests.support import post_search, synthetic_image

MAX_FILE_BYTES = 2_000_000
MAX_REQUEST_BYTES = 6_000_000
MAX_FILES = 8


post = post_search


def assert_error(response: requests.Response, status: int, code: str, filename: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    if filename is not None:
        assert error["filename"] == filename


@pytest.fixture(autouse=True)
def service_still_answers(serve_base_url: str, indexed_images: list[Path]) -> None:
    """After every bad request, a valid one still succeeds."""
    yield
    path = indexed_images[0]
    response = post(serve_base_url, [(path.name, path.read_bytes())])
    assert response.status_code == 200
    assert response.json()["results"][0]["matches"][0]["id"] == 0


REFUSED_FILES: list[tuple[str, Callable[[], bytes], int, str]] = [
    ("text.jpg", lambda: b"hello, I am not a picture", 400, "not_an_image"),
    ("empty.png", lambda: b"", 400, "empty_file"),
    ("truncated.jpg", lambda: images.jpeg(2, (640, 480))[:3000], 400, "corrupt_image"),
    ("truncated.png", lambda: images.png(2, (640, 480))[:2000], 400, "corrupt_image"),
    (
        "drawing.svg",
        lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        415,
        "unsupported_format",
    ),
    (
        "drawing.jpg",
        lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
        415,
        "unsupported_format",
    ),
    ("doc.pdf", lambda: b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", 415, "unsupported_format"),
    (
        "photo.heic",
        lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
        415,
        "unsupported_format",
    ),
    ("icon.ico", lambda: images.encode(synthetic_image(1, (32, 32)), "ICO"), 400, "not_an_image"),
    ("bomb_small.png", lambda: images.png_header_only(10_000, 5_001), 413, "too_many_pixels"),
    ("bomb_huge.png", lambda: images.png_header_only(100_000, 100_000), 413, "too_many_pixels"),
    ("bomb_wide.png", lambda: images.png_header_only(2**31 - 1, 2), 413, "too_many_pixels"),
    ("big.png", lambda: images.padded_png(MAX_FILE_BYTES + 1), 413, "file_too_large"),
]


@pytest.mark.parametrize(("name", "make", "status", "code"), REFUSED_FILES, ids=[case[0] for case in REFUSED_FILES])
def test_refused_files(serve_base_url: str, name: str, make: Callable[[], bytes], status: int, code: str) -> None:
    assert_error(post(serve_base_url, [(name, make())]), status, code, filename=name)


def test_file_exactly_at_byte_limit_is_accepted(serve_base_url: str) -> None:
    response = post(serve_base_url, [("edge.png", images.padded_png(MAX_FILE_BYTES))])
    assert response.status_code == 200, response.text


def test_image_exactly_at_pixel_limit_is_accepted(serve_base_url: str) -> None:
    # The default limit is 50,000,000 pixels; a flat grey PNG of exactly that many stays small on the wire.
    data = images.encode(Image.new("L", (10_000, 5_000), 128), "PNG", optimize=True)
    assert len(data) < MAX_FILE_BYTES
    assert post(serve_base_url, [("edge.png", data)]).status_code == 200


ACCEPTED_FILES: list[tuple[str, Callable[[], bytes]]] = [
    ("animated.gif", images.animated_gif),
    ("animated.webp", images.animated_webp),
    ("cmyk.jpg", lambda: images.encode(synthetic_image(5, (300, 200)).convert("CMYK"), "JPEG")),
    ("gray.jpg", lambda: images.encode(synthetic_image(5, (300, 200)).convert("L"), "JPEG")),
    ("deep.png", images.png_16bit_gray),
    ("palette.png", images.palette_with_transparency),
    ("alpha.png", images.rgba_half_transparent),
    ("image.bmp", lambda: images.encode(synthetic_image(6, (120, 90)), "BMP")),
    ("image.tiff", lambda: images.encode(synthetic_image(6, (120, 90)), "TIFF")),
    ("wide.png", lambda: images.encode(Image.new("RGB", (10_000, 3), (200, 10, 10)), "PNG")),
    ("tall.png", lambda: images.encode(Image.new("RGB", (3, 10_000), (10, 200, 10)), "PNG")),
    ("dot.png", lambda: images.encode(Image.new("RGB", (1, 1), (0, 0, 255)), "PNG")),
    ("no_extension", lambda: images.jpeg(3)),
]


@pytest.mark.parametrize(("name", "make"), ACCEPTED_FILES, ids=[case[0] for case in ACCEPTED_FILES])
def test_accepted_files(serve_base_url: str, name: str, make: Callable[[], bytes]) -> None:
    response = post(serve_base_url, [(name, make())])
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["filename"] == name and len(result["matches"]) == 5


def test_exif_rotated_photo_is_turned_upright(serve_base_url: str, indexed_images: list[Path]) -> None:
    upright = Image.open(indexed_images[4]).convert("RGB")
    response = post(serve_base_url, [("rotated.jpg", images.exif_rotated_jpeg(upright))])
    top = response.json()["results"][0]["matches"][0]
    assert top["id"] == 4 and top["score"] > 0.97


def test_one_bad_file_among_good_ones(serve_base_url: str, indexed_images: list[Path]) -> None:
    files = [
        (indexed_images[1].name, indexed_images[1].read_bytes()),
        ("broken.jpg", b"not an image"),
        (indexed_images[2].name, indexed_images[2].read_bytes()),
    ]
    response = post(serve_base_url, files)
    assert response.status_code == 200
    first, bad, third = response.json()["results"]
    assert first["matches"][0]["id"] == 1 and third["matches"][0]["id"] == 2
    assert "matches" not in bad
    assert bad["error"] == {"code": "not_an_image", "message": bad["error"]["message"], "filename": "broken.jpg"}


def test_every_file_bad_gives_first_failure_and_each_files_error(serve_base_url: str) -> None:
    response = post(
        serve_base_url, [("a.txt", b""), ("b.jpg", b"junk"), ("c.png", images.padded_png(MAX_FILE_BYTES + 1))]
    )
    assert_error(response, 400, "empty_file", filename="a.txt")
    results = response.json()["results"]
    assert [(r["filename"], r["error"]["code"]) for r in results] == [
        ("a.txt", "empty_file"),
        ("b.jpg", "not_an_image"),
        ("c.png", "file_too_large"),
    ]


def test_a_file_over_the_size_limit_beside_a_good_one_is_a_per_file_error(
    serve_base_url: str, indexed_images: list[Path]
) -> None:
    good = indexed_images[3]
    response = post(
        serve_base_url, [("big.png", images.padded_png(MAX_FILE_BYTES + 1)), (good.name, good.read_bytes())]
    )
    assert response.status_code == 200, response.text
    big, answered = response.json()["results"]
    assert big["error"]["code"] == "file_too_large" and "1.91 MB" in big["error"]["message"]
    assert answered["matches"][0]["id"] == 3


def test_too_many_files(serve_base_url: str) -> None:
    small = images.jpeg(1, (32, 32))
    assert post(serve_base_url, [(f"{i}.jpg", small) for i in range(MAX_FILES)]).status_code == 200
    assert_error(post(serve_base_url, [(f"{i}.jpg", small) for i in range(MAX_FILES + 1)]), 413, "too_many_files")


def test_request_over_total_byte_limit(serve_base_url: str) -> None:
    part = images.padded_png(MAX_FILE_BYTES - 10)
    response = post(serve_base_url, [(f"{i}.png", part) for i in range(4)])
    assert_error(response, 413, "request_too_large")


def test_request_over_limit_without_content_length_is_cut_while_streaming(serve_base_url: str) -> None:
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n\r\n'.encode()

    def body():  # chunked transfer: no Content-Length to refuse up front
        yield head
        for _ in range(MAX_REQUEST_BYTES // 65536 + 10):
            yield b"\x00" * 65536

    response = requests.post(
        f"{serve_base_url}/search",
        data=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] in {"request_too_large", "file_too_large"}


def test_no_files(serve_base_url: str) -> None:
    response = requests.post(f"{serve_base_url}/search", files={"other": ("x", b"1")}, timeout=30)
    assert_error(response, 400, "no_files")
    response = requests.post(f"{serve_base_url}/search", data={"k": "3"}, files=[], timeout=30)
    assert response.status_code in (400, 415)


def test_non_multipart_body(serve_base_url: str) -> None:
    response = requests.post(f"{serve_base_url}/search", json={"files": ["x"]}, timeout=30)
    assert_error(response, 415, "not_multipart")
    response = requests.post(f"{serve_base_url}/search", data=images.jpeg(), timeout=30)
    assert_error(response, 415, "not_multipart")


def test_malformed_multipart(serve_base_url: str) -> None:
    response = requests.post(
        f"{serve_base_url}/search",
        data=b"--x\r\nthis is not a header block\r\n\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=x"},
        timeout=30,
    )
    assert 400 <= response.status_code < 500
    assert "error" in response.json()


def test_thousands_of_form_fields(serve_base_url: str) -> None:
    fields = [(f"f{i}", (None, "1")) for i in range(3000)]
    response = requests.post(f"{serve_base_url}/search", files=fields, timeout=30)
    assert_error(response, 413, "too_many_fields")


@pytest.mark.parametrize("k", ["0", "-1", "abc", "101", "1.5", "", "99999999999999"])
def test_bad_k(serve_base_url: str, k: str) -> None:
    assert_error(post(serve_base_url, [("a.jpg", images.jpeg())], params={"k": k}), 422, "invalid_k")


def test_unknown_route_and_wrong_method_are_json(serve_base_url: str) -> None:
    response = requests.get(f"{serve_base_url}/nope", timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = requests.delete(f"{serve_base_url}/search", timeout=30)  # GET /search is a text query
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.text(max_size=24))
def test_any_text_as_k_image_id_or_size_is_a_4xx_or_an_answer(serve_base_url: str, raw: str) -> None:
    small = images.jpeg(1, (32, 32))
    responses = [
        post(serve_base_url, [("a.jpg", small)], params={"k": raw}),
        requests.get(f"{serve_base_url}/images/{quote(raw, safe='')}", timeout=30),
        requests.get(f"{serve_base_url}/images/0", params={"size": raw}, timeout=30),
    ]
    for response in responses:
        assert response.status_code < 500, (raw, response.status_code, response.text[:200])
        if response.status_code >= 400:
            assert response.json()["error"]["code"], response.text


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize("problem", ["short_out_of_range", "negative_rational"])
def test_a_photo_with_a_malformed_exif_block_is_answered_not_a_500(
    serve_base_url: str, indexed_images: list[Path], fmt: str, problem: str
) -> None:
    """Pillow's exif_transpose raises struct.error on these EXIF values (a 500 before); the photo is
    turned upright by its orientation alone and found."""
    upright = Image.open(indexed_images[6]).convert("RGB")
    response = post(serve_base_url, [(f"exif.{fmt.lower()}", images.malformed_exif(fmt, upright, problem))])
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["matches"][0]["id"] == 6


def test_a_webp_whose_exif_does_not_parse_is_corrupt_beside_a_good_photo(
    serve_base_url: str, indexed_images: list[Path]
) -> None:
    bad = images.malformed_exif("WEBP", synthetic_image(2, (64, 48)), "not_tiff")
    good = indexed_images[1]
    response = post(serve_base_url, [("bad.webp", bad), (good.name, good.read_bytes())])
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert first["error"]["code"] == "corrupt_image" and second["matches"][0]["id"] == 1


def test_files_that_together_decode_to_more_than_the_request_pixel_budget_are_413(serve_base_url: str) -> None:
    """Each 7000 x 7000 PNG is under max_pixels (50 M); three of them (147 M) are over max_request_pixels (100 M)."""
    header = images.png_header_only(7000, 7000)
    response = post(serve_base_url, [(f"{index}.png", header) for index in range(3)])
    assert_error(response, 413, "too_many_pixels_in_request")
    two = post(serve_base_url, [(f"{index}.png", header) for index in range(2)])  # 98 M: decoded (and damaged)
    assert (
        two.status_code == 400 and [entry["error"]["code"] for entry in two.json()["results"]] == ["corrupt_image"] * 2
    )


def test_an_urlencoded_body_at_the_text_cap_is_read_and_one_byte_over_is_413(serve_base_url: str) -> None:
    from serve_app.config import UploadLimits
    from serve_app.forms import max_urlencoded_bytes

    cap = max_urlencoded_bytes(UploadLimits(max_files=8, max_file_bytes=2_000_000, max_request_bytes=6_000_000))
    assert cap < MAX_REQUEST_BYTES
    at_cap = b"text=" + b"a" * (cap - len(b"text="))
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    read = requests.post(f"{serve_base_url}/search", data=at_cap, headers=headers, timeout=30)
    assert_error(read, 413, "text_too_long")  # read and parsed: the one text is too long
    over = requests.post(f"{serve_base_url}/search", data=at_cap + b"a", headers=headers, timeout=30)
    assert_error(over, 413, "request_too_large")
    separators = requests.post(f"{serve_base_url}/search", data=b"a&" * 100_000, headers=headers, timeout=30)
    assert separators.status_code == 413
