"""What both engines do with the command line's answers around a build: retention, the removal
guard, trusting stat data, and the lines printed about the plan; `plan_from_args` is those steps
in the order both engines take them. (cli.py parses the command line
and picks an engine; the engines import this module, never cli.py.)"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace

from image_search.artifact import RetentionPolicy
from image_search.storage import mtime_margin_ns
from index_builder.build import BuildError, BuildPlan, Collection, ModelInfo, plan_build
from index_builder.diff import distrust_fresh_mtimes, removal_refusal


def retention_policy(args: argparse.Namespace) -> RetentionPolicy:
    return RetentionPolicy(retention_s=args.retention_hours * 3600, keep_versions=args.keep_versions)


def trusted_stat_only(collection: Collection) -> Collection:
    """The collection as a build that reads its files from now on may record it: stamps too fresh
    to rule out a same-size rewrite within their tick are forgotten (index_builder.diff)."""
    entries = distrust_fresh_mtimes(collection.entries, time.time_ns(), mtime_margin_ns(collection.source))
    return replace(collection, entries=entries)


def check_removals(plan: BuildPlan, args: argparse.Namespace) -> None:
    """Refuse (BuildError) a build that removes more than --max-removed-share of the published images."""
    if args.allow_mass_removal or plan.previous is None:
        return
    refusal = removal_refusal(plan.diff, len(plan.previous.records), args.max_removed_share)
    if refusal is not None:
        raise BuildError(
            f"{refusal}; nothing was published. If {plan.collection.source.uri} is right and that many "
            "images were removed on purpose, run again with --allow-mass-removal; otherwise check that "
            "it is the whole collection (mounted, readable, the right --images)"
        )


def announce(plan: BuildPlan) -> None:
    if plan.full_reason is not None:
        print(f"full rebuild of {len(plan.collection.entries)} images: {plan.full_reason}")


def plan_from_args(
    collection: Collection,
    model: ModelInfo,
    args: argparse.Namespace,
    before_commit: Callable[[], None] | None = None,
) -> BuildPlan:
    """The build plan the command line asks for, refused (BuildError) past the removal guard and
    announced; `before_commit` (the commit lock's check) runs before each CURRENT write. Called once
    the model is known: every file is read after this moment, so stamps newer than it cannot be trusted."""
    plan = plan_build(
        trusted_stat_only(collection),
        model,
        full=args.full,
        retention=retention_policy(args),
        compact=args.compact,
        max_index_memory=args.max_index_memory,
    )
    check_removals(plan, args)
    announce(plan)
    return replace(plan, before_commit=before_commit)
