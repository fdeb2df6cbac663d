"""The `image-search` command: search, add, delete and info against a running service.

    image-search search cat.jpg "a dog on a beach" -k 10        # score  path, per query
    image-search search --combined beach.jpg -- -people 0.5:sunset
    image-search search "red car" --paths | xargs open          # paths only, for pipes
    image-search add ~/Pictures/new/                            # needs IMAGE_SEARCH_WRITE_TOKEN
    image-search delete 17 42
    image-search info

Exit status: 0 on success, 1 when the server refused (its message on stderr), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from image_search_client.client import (
    DEFAULT_URL,
    WRITE_TOKEN_ENV,
    ClientError,
    ImageSearchClient,
    WeightedQuery,
    image_files,
)

# rclip's weight syntax: "2:sunset", "-0.5:people"; a bare leading "-"/"+" means weight -1/+1.
WEIGHT_PREFIX = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)):(.+)$", re.DOTALL)
UPLOAD_BATCH = 8  # files per POST /images: at or under the server's default max_files


def parse_weighted(raw: str) -> WeightedQuery:
    match = WEIGHT_PREFIX.match(raw)
    if match:
        return WeightedQuery(match.group(2), float(match.group(1)))
    if raw[:1] in "+-" and len(raw) > 1:
        return WeightedQuery(raw[1:], -1.0 if raw[0] == "-" else 1.0)
    return WeightedQuery(raw)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="image-search", description="Talk to a running image search service.")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the service (default {DEFAULT_URL})")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    verbs = parser.add_subparsers(dest="verb", required=True)

    search = verbs.add_parser("search", help="find the images most like photos and/or texts")
    search.add_argument(
        "queries", nargs="+", metavar="PHOTO_OR_TEXT", help="a path that exists is a photo, anything else a text"
    )
    search.add_argument("-k", type=int, default=5, help="results per query (default 5)")
    search.add_argument(
        "--prefix", action="append", default=[], help="only images whose key starts with this (repeatable)"
    )
    search.add_argument(
        "--combined", action="store_true", help="one result list for the weighted sum (W:query, -query)"
    )
    output = search.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the server's JSON answer")
    output.add_argument("--paths", action="store_true", help="print paths only, one a line")

    add = verbs.add_parser("add", help=f"add images to the collection (token from ${WRITE_TOKEN_ENV})")
    add.add_argument("paths", nargs="+", metavar="FILE_OR_FOLDER")
    add.add_argument("--json", action="store_true", help="print the server's JSON answers")
    add.add_argument("--wait", choices=["indexed", "stored"], default="indexed")

    delete = verbs.add_parser("delete", help=f"remove images by id (token from ${WRITE_TOKEN_ENV})")
    delete.add_argument("ids", nargs="+", type=int, metavar="ID")
    delete.add_argument("--wait", choices=["indexed", "stored"], default="indexed")

    verbs.add_parser("info", help="what the service serves")
    return parser.parse_args(argv)


def print_matches(answer: dict[str, Any], paths_only: bool, out: TextIO) -> None:
    results = answer.get("results", [])
    for entry in results:
        if len(results) > 1 and not paths_only:
            name = entry.get("filename") or entry.get("text") or "combined"
            print(f"# {name}", file=out)
        if "error" in entry:
            print(f"error: {entry['error'].get('message')}", file=sys.stderr)
            continue
        for match in entry.get("matches", []):
            print(match["path"] if paths_only else f"{match['score']:.4f}  {match['path']}", file=out)


def run_search(client: ImageSearchClient, args: argparse.Namespace, out: TextIO) -> int:
    if args.combined:
        answer = client.search_combined([parse_weighted(q) for q in args.queries], k=args.k, prefixes=args.prefix)
    else:
        answer = client.search(args.queries, k=args.k, prefixes=args.prefix)
    if args.json:
        json.dump(answer, out, indent=1)
        print(file=out)
    else:
        print_matches(answer, args.paths, out)
    return 1 if any("error" in entry for entry in answer.get("results", [])) else 0


def run_add(client: ImageSearchClient, args: argparse.Namespace, out: TextIO) -> int:
    from tqdm import tqdm

    files = list(image_files(args.paths))
    if not files:
        raise ClientError("no image files found in what was given")
    failed = 0
    # A progress bar on stderr (kept off pipes), one POST per batch of files.
    with tqdm(total=len(files), unit="img", disable=len(files) < 2 or not sys.stderr.isatty()) as bar:
        for start in range(0, len(files), UPLOAD_BATCH):
            batch = files[start : start + UPLOAD_BATCH]
            answer = client.add(batch, wait=args.wait)
            for entry in answer.get("results", []):
                if "error" in entry:
                    failed += 1
                    print(f"error: {entry.get('filename')}: {entry['error'].get('message')}", file=sys.stderr)
                elif args.json:
                    print(json.dumps(entry), file=out)
                else:
                    print(f"{entry['status']:<9}  {entry['id']}  {entry['key']}", file=out)
            bar.update(len(batch))
    return 1 if failed else 0


def run_delete(client: ImageSearchClient, args: argparse.Namespace, out: TextIO) -> int:
    for image_id in args.ids:
        client.delete(image_id, wait=args.wait)
        print(f"deleted  {image_id}", file=out)
    return 0


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = parse_args(argv)
    out = out or sys.stdout
    client = ImageSearchClient(args.url, timeout_s=args.timeout)
    try:
        if args.verb == "search":
            return run_search(client, args, out)
        if args.verb == "add":
            return run_add(client, args, out)
        if args.verb == "delete":
            return run_delete(client, args, out)
        json.dump(client.info(), out, indent=1)
        print(file=out)
        return 0
    except ClientError as exc:
        print(f"image-search: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
