"""The `image-search` command and its Python client, against the real Serve app of the test session."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from image_search_client import ImageSearchClient, WeightedQuery
from image_search_client.cli import main, parse_weighted
from tests.support import free_port


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("sunset", WeightedQuery("sunset", 1.0)),
        ("2:sunset", WeightedQuery("sunset", 2.0)),
        ("-0.5:people", WeightedQuery("people", -0.5)),
        ("-people", WeightedQuery("people", -1.0)),
        ("+people", WeightedQuery("people", 1.0)),
        ("-", WeightedQuery("-", 1.0)),
        ("10:30 train", WeightedQuery("30 train", 10.0)),
    ],
)
def test_weights_use_rclips_prefix_syntax(raw: str, expected: WeightedQuery) -> None:
    assert parse_weighted(raw) == expected


def test_search_with_a_photo_prints_score_and_path_best_first(serve_base_url: str, indexed_images: list[Path]) -> None:
    photo = indexed_images[3]
    code, printed = run_cli("--url", serve_base_url, "search", str(photo), "-k", "3")
    assert code == 0
    lines = printed.splitlines()
    assert len(lines) == 3
    score, path = lines[0].split("  ", 1)
    assert path == photo.name
    assert float(score) > 0.99
    scores = [float(line.split("  ", 1)[0]) for line in lines]
    assert scores == sorted(scores, reverse=True)


def test_paths_mode_prints_only_paths_for_pipes(serve_base_url: str, indexed_images: list[Path]) -> None:
    code, printed = run_cli("--url", serve_base_url, "search", str(indexed_images[0]), "-k", "2", "--paths")
    assert code == 0
    assert printed.splitlines()[0] == indexed_images[0].name
    assert all("  " not in line for line in printed.splitlines())


def test_json_mode_prints_the_servers_answer(serve_base_url: str) -> None:
    code, printed = run_cli("--url", serve_base_url, "search", "a red square", "-k", "4", "--json")
    assert code == 0
    answer = json.loads(printed)
    assert answer["results"][0]["text"] == "a red square"
    assert len(answer["results"][0]["matches"]) == 4
    assert "index_version" in answer


def test_several_queries_get_one_headed_group_each(serve_base_url: str, indexed_images: list[Path]) -> None:
    code, printed = run_cli("--url", serve_base_url, "search", str(indexed_images[1]), "blue sky", "-k", "2")
    assert code == 0
    assert printed.splitlines()[0] == f"# {indexed_images[1].name}"
    assert "# blue sky" in printed.splitlines()


def test_combined_search_sends_weights_and_answers_one_list(serve_base_url: str, indexed_images: list[Path]) -> None:
    client = ImageSearchClient(serve_base_url)
    photo = str(indexed_images[2])
    answer = client.search_combined([WeightedQuery(photo, 1.0), WeightedQuery("stripes", -0.25)], k=3)
    (entry,) = answer["results"]
    assert [part["weight"] for part in entry["combined"]] == [1.0, -0.25]
    assert len(entry["matches"]) == 3
    code, printed = run_cli(
        "--url", serve_base_url, "search", "--combined", "-k", "3", "--paths", photo, "--", "-0.25:stripes"
    )
    assert code == 0
    assert printed.splitlines() == [match["path"] for match in entry["matches"]]


def test_a_refused_request_exits_1_with_the_servers_message(
    serve_base_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = run_cli("--url", serve_base_url, "search", "cats", "-k", "0")
    assert code == 1
    assert "k" in capsys.readouterr().err.split("image-search: ", 1)[1]


def test_an_unreachable_service_exits_1_and_says_where(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, _ = run_cli("--url", url, "--timeout", "5", "info")
    assert code == 1
    assert url in capsys.readouterr().err


def test_info_prints_the_services_info(serve_base_url: str) -> None:
    code, printed = run_cli("--url", serve_base_url, "info")
    assert code == 0
    assert json.loads(printed)["embedding_dim"] > 0


def test_the_installed_command_runs(serve_base_url: str) -> None:
    # The [project.scripts] entry point and `python -m` both reach the same main().
    done = subprocess.run(
        [sys.executable, "-m", "image_search_client", "--url", serve_base_url, "search", "green", "-k", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1
