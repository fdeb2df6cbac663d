"""Groups of near-duplicate images of a collection, from pairs found by a range search.

Pairs (i, j) with cosine >= threshold are joined into connected groups (union-find). Each group
lists its members by id, the first member being the lowest id, and marks which members are
byte-identical copies (same sha256) of another member and which are only similar. Pages of groups
are ordered by their first id, so `offset` and `limit` page through a stable list.

Pure Python, tested without Ray or FAISS.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, item: int) -> int:
        self.parent.setdefault(item, item)
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)


def group_pairs(pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected groups of the ids in `pairs` (self-pairs ignored), each sorted, ordered by first id."""
    links = UnionFind()
    for a, b in pairs:
        if a != b:
            links.union(a, b)
    members: dict[int, list[int]] = defaultdict(list)
    for item in list(links.parent):
        members[links.find(item)].append(item)
    return sorted((sorted(group) for group in members.values() if len(group) > 1), key=lambda g: g[0])


def describe_group(group: list[int], sha256_of: Mapping[int, str], path_of: Mapping[int, str]) -> dict[str, Any]:
    """One group for the answer: each member with `identical` true when another member has its exact bytes."""
    counts: dict[str, int] = defaultdict(int)
    for image_id in group:
        counts[sha256_of[image_id]] += 1
    return {
        "ids": group,
        "members": [
            {"id": image_id, "path": path_of[image_id], "identical": counts[sha256_of[image_id]] > 1}
            for image_id in group
        ],
        "identical_sets": sorted(
            sorted(i for i in group if sha256_of[i] == digest) for digest, count in counts.items() if count > 1
        ),
    }
