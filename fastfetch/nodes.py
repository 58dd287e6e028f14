"""Several machines, one dataset: which node this is, and merging the nodes' outputs.

Units are dealt round-robin over the nodes (unit ``i`` of the selection goes to node
``i % count``), so no coordination is needed while fetching. Each node keeps its own manifest
and its own MDS subtree, and at the end writes a small ``_nodes/<node>/summary.json`` (its done
unit folders and totals) next to the output, locally or on object storage. ``--merge`` (or rank
0, when every summary says complete) turns the summaries into the global index and stats.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fastfetch import storage
from fastfetch.errors import UsageError
from fastfetch.formats import OutputFormat
from fastfetch.mds import Layout, merge_index
from fastfetch.storage import is_remote

SUMMARY = "summary.json"


@dataclass(frozen=True, slots=True)
class Node:
    rank: int = 0
    count: int = 1

    @property
    def name(self) -> str:
        """The node's folder name ("" on a single machine)."""
        return "" if self.count == 1 else f"node-{self.rank:02d}-of-{self.count:02d}"


def detect(node_rank: int | None = None, num_nodes: int | None = None) -> Node:
    """The node from --node-rank/--num-nodes, else torchrun's RANK/WORLD_SIZE, else Slurm's
    SLURM_PROCID/SLURM_NTASKS, else a single node."""
    if num_nodes is not None or node_rank is not None:
        rank, count = node_rank or 0, num_nodes or 1
    elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        rank, count = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    elif "SLURM_NTASKS" in os.environ and "SLURM_PROCID" in os.environ:
        rank, count = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    else:
        return Node()
    if count < 1 or not 0 <= rank < count:
        raise UsageError(
            f"node rank {rank} is not in 0..{count - 1} (from --node-rank/--num-nodes, RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)"
        )
    return Node(rank, count)


def write_summary(
    out: str, state_dir: Path, node: Node, dirs: list[str], totals: dict[str, Any], complete: bool, settings: dict[str, Any]
) -> None:
    """Record what this node contributed and with which settings (in its state folder, and on
    the remote output)."""
    path = state_dir / SUMMARY
    payload = {
        "node": node.name,
        "rank": node.rank,
        "count": node.count,
        "complete": complete,
        "dirs": dirs,
        "totals": totals,
        "settings": settings,
    }
    storage.write_atomically(path, orjson.dumps(payload, option=orjson.OPT_INDENT_2))
    if is_remote(out):
        storage.upload(state_dir, f"{out}/_nodes/{node.name}", [SUMMARY])


def read_summaries(out: str, cache: Path) -> list[dict[str, Any]]:
    """Every node's summary under the output (downloaded into ``cache`` when remote)."""
    if is_remote(out):
        paths = storage.pull(out, cache, lambda rel: rel.endswith(f"/{SUMMARY}"), prefix="_nodes/")
    else:
        paths = sorted(Path(out).glob(f"_nodes/*/{SUMMARY}"))
    return [orjson.loads(p.read_bytes()) for p in paths]


def merge_nodes(out: str, layout: Layout, cache: Path) -> dict[str, Any]:
    """Global index and stats over every node's done units; returns the global stats. The
    buckets and format come from the settings the nodes ran with (they agree), not from the
    flags of whoever merges: a hand-run ``--merge`` needs none of them."""
    summaries = read_summaries(out, cache)
    if not summaries:
        raise UsageError(f"no node summaries under {out}/_nodes/: run the fetch on every node first")
    if len({s["count"] for s in summaries}) != 1:
        raise UsageError(f"{out}/_nodes/ mixes runs with different node counts; remove the stale ones")
    _check_agreement(out, summaries)
    settings = {k: v for k, v in (summaries[0].get("settings") or {}).items() if k != "plan"}
    if settings:
        layout = dataclasses.replace(
            layout,
            buckets=tuple(settings.get("buckets", ())),
            format=OutputFormat(settings.get("format", OutputFormat.FASTFETCH.value)),
        )
    rows = merge_index(layout, [rel for s in summaries for rel in s["dirs"]])
    rejected: Counter[str] = Counter()
    stats: dict[str, Any] = {"items": 0, "kept": 0, "bytes_downloaded": 0, "bytes_written": 0}
    for s in summaries:
        for key in stats:
            stats[key] += s["totals"].get(key, 0)
        rejected.update(s["totals"].get("rejected", {}))
    expected = summaries[0]["count"]
    missing = sorted(set(range(expected)) - {s["rank"] for s in summaries})
    stats.update(
        rejected=dict(rejected.most_common()),
        rows_in_index=rows,
        nodes={
            s["node"]: {"complete": s["complete"], "units": len(s["dirs"]), "kept": s["totals"].get("kept", 0)} for s in summaries
        },
        incomplete_nodes=[s["node"] for s in summaries if not s["complete"]] + [Node(r, expected).name for r in missing],
        status="merged",
        settings=settings,  # what a single-node stats.json records too (encode/run.py reads "dataset")
    )
    data = orjson.dumps(stats, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    if is_remote(out):
        storage.write_atomically(cache / "stats.json", data)
        storage.upload(cache, out, ["stats.json"])
    else:
        storage.write_atomically(Path(out) / "stats.json", data)
    return stats


def _check_agreement(out: str, summaries: list[dict[str, Any]]) -> None:
    """Nodes whose units would not make one dataset: built with other settings (--min-size on one
    node, another on the next) or from another plan (another copy of the list, another
    --limit), or holding the same unit twice."""
    first = summaries[0]
    for other in summaries[1:]:
        a, b = first.get("settings"), other.get("settings")
        if a is not None and b is not None and (a.get("plan") is None or b.get("plan") is None):
            # a node stopped before it read its whole plan has no digest: it is incomplete anyway
            a, b = {k: v for k, v in a.items() if k != "plan"}, {k: v for k, v in b.items() if k != "plan"}
        if a is not None and b is not None and a != b:
            diff = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            raise UsageError(
                f"{first['node']} and {other['node']} under {out} were run with different settings or lists ({diff}): "
                "their units do not make one dataset. Rerun the odd node with the same flags and lists as the others "
                "(into a fresh --local-cache), then --merge"
            )
    owners: dict[str, str] = {}
    for s in summaries:
        for rel in s["dirs"]:
            unit = rel.rsplit("/", 1)[-1]
            if unit in owners and owners[unit] != s["node"]:
                raise UsageError(
                    f"unit {unit} was finished by both {owners[unit]} and {s['node']} under {out}; remove it from one "
                    "node (its folder and that node's _nodes/ state) and rerun that node, then --merge"
                )
            owners[unit] = s["node"]


def all_complete(out: str, cache: Path, count: int) -> bool:
    summaries = read_summaries(out, cache)
    return len({s["rank"] for s in summaries if s["complete"] and s["count"] == count}) == count
