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
        records=(ImageRecord("a.jpg", 10, "00"), ImageRecord("b/c.png", 20, "11")),
        index_sha256="ff",
        created_at="2026-01-01T00:00:00Z",
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
    ],
)
def test_malformed_manifests_are_refused(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(sample().to_json())
    mutate(data)
    with pytest.raises(ArtifactError, match=message):
        Manifest.from_json(json.dumps(data))


def test_not_json_is_refused() -> None:
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Manifest.from_json(b"\x00garbage")


def test_other_dim_or_model_is_refused_with_a_message_naming_both() -> None:
    with pytest.raises(ArtifactError, match=r"32-d vectors .* 512-d"):
        check_compatible(sample(), fingerprint="abc", embedding_dim=512, model_name="openai/clip")
    with pytest.raises(ArtifactError, match=r"fingerprint abc.*fingerprint zzz"):
        check_compatible(sample(), fingerprint="zzz", embedding_dim=32, model_name="other-model")
    check_compatible(sample(), fingerprint="abc", embedding_dim=32, model_name="any name, same weights")
