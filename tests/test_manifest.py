"""Manifest round trip and refusal of artifacts that do not fit."""

from __future__ import annotations

import json

import pytest

from image_search.compatibility import check_compatible
from image_search.errors import ArtifactError
from image_search.manifest import FORMAT_VERSION, ImageRecord, Manifest


def sample() -> Manifest:
    return Manifest(
        model="m",
        model_fingerprint="abc",
        embedding_dim=32,
        preprocessing={"shortest_edge": 224},
        index={"factory": "Flat", "params": {}},
        source="/data/images",
        records=(ImageRecord(0, "a.jpg", 10, "00", 123), ImageRecord(7, "b/c.png", 20, "11")),
        index_sha256="ff",
        created_at="2026-01-01T00:00:00Z",
        next_id=9,
        precision="fp32",
    )


def test_round_trip() -> None:
    manifest = sample()
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert json.loads(manifest.to_json())["count"] == 2


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format_version=FORMAT_VERSION + 1), "format_version"),
        (lambda d: d.pop("records"), "incomplete"),
        (lambda d: d.update(count=5), "count 5"),
        (lambda d: d.pop("next_id"), "incomplete"),
        (lambda d: d.update(next_id=7), "outside 0..next_id-1"),
        (lambda d: d["records"][1].update(id=0), "one id for two images"),
        (lambda d: d["records"][1].update(key="a.jpg"), "one key twice"),
    ],
)
def test_malformed_manifests_are_refused(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(sample().to_json())
    mutate(data)
    with pytest.raises(ArtifactError, match=message):
        Manifest.from_json(json.dumps(data))


def test_a_version_1_manifest_is_refused_with_the_fix() -> None:
    data = json.loads(sample().to_json())
    data["format_version"] = 1
    with pytest.raises(ArtifactError, match=r"format_version 1 .*rebuild the index"):
        Manifest.from_json(json.dumps(data))


def test_record_finds_stable_ids_not_positions() -> None:
    manifest = sample()
    assert manifest.record(7) == ImageRecord(7, "b/c.png", 20, "11")
    assert manifest.record(1) is None  # a position, not an id
    assert manifest.record(9) is None and manifest.record(-1) is None
    assert manifest.count == 2


def test_not_json_is_refused() -> None:
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Manifest.from_json(b"\x00garbage")


def test_other_dim_or_model_is_refused_with_a_message_naming_both() -> None:
    with pytest.raises(ArtifactError, match=r"32-d vectors .* 512-d"):
        check_compatible(sample(), fingerprint="abc", embedding_dim=512, model_name="openai/clip")
    with pytest.raises(ArtifactError, match=r"fingerprint abc.*fingerprint zzz"):
        check_compatible(sample(), fingerprint="zzz", embedding_dim=32, model_name="other-model")
    check_compatible(sample(), fingerprint="abc", embedding_dim=32, model_name="any name, same weights")
