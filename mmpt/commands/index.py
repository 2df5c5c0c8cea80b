"""``mmpt index EMB_DIR... --out INDEX_DIR``: a FAISS index over ``mmpt embed`` folders (mmpt.search.build)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``mmpt index``."""
    p = sub.add_parser("index", help="build a FAISS index (exact or compressed) over `mmpt embed` folders",
                       description="Streams the embeddings (never loads them all), resumes an interrupted build, "
                       "and keeps the metadata (key, shard, row, caption/json, tar member offsets) beside the index. "
                       "Exact search below --exact-below vectors; above, an IVF index with the richest codes "
                       "--memory-budget allows, its nprobe tuned to --recall-target against exact search.")
    p.add_argument("emb_dirs", nargs="+", metavar="EMB_DIR", help="`mmpt embed --out` folders of one model")
    p.add_argument("--out", required=True, help="index folder (rerun the same command to resume a build)")
    p.add_argument("--memory-budget", default="4G", help="memory the index may take, e.g. 4G, 512M (default: 4G)")
    p.add_argument("--exact-below", type=int, default=500_000,
                   help="exact (flat) search below this many vectors (default: 500000)")
    p.add_argument("--recall-target", type=float, default=0.95,
                   help="recall@10 vs exact search the approximate index is tuned to (default: 0.95; if the codes cannot reach it, nprobe stops within 0.005 of what probing every list gives)")
    p.add_argument("--factory", help="a FAISS index_factory string instead of the automatic choice")
    p.add_argument("--no-rerank", action="store_true",
                   help="rank an approximate index's hits by its codes alone (default: re-rank its shortlist by exact "
                        "scores from the embedding files, which must then stay where they are)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Build the index and print its summary."""
    from mmpt.search.build import build_index

    print(build_index(args.emb_dirs, args.out, memory_budget=args.memory_budget, exact_below=args.exact_below,
                      recall_target=args.recall_target, factory=args.factory, progress=not args.no_progress,
                      rerank=not args.no_rerank))
    return 0
