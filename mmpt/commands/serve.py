"""``mmpt serve MODEL INDEX_DIR``: the search service and its web page (mmpt.search.app)."""

from __future__ import annotations

import argparse
import ipaddress
import warnings


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``mmpt serve``."""
    p = sub.add_parser("serve", help="serve an index: HTTP API, clip-retrieval's /knn-service and a web page",
                       description="Embeds queries of any modality MODEL has (typed text, uploaded files) with "
                       "the model's own data sides and returns the nearest hits. API docs at /docs.")
    p.add_argument("model", help="the exported .safetensors file or run directory that embedded the index")
    p.add_argument("index_dir", metavar="INDEX_DIR", help="an `mmpt index --out` folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted (default: 20)")
    p.add_argument("--k-max", type=int, default=100, help="most hits one query may ask for (default: 100)")
    p.add_argument("--max-batch", type=int, default=32, help="queries embedded together under load (default: 32)")
    p.add_argument("--allow-nonfinite", action="store_true", help="load weights holding NaN/inf (with a warning)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load, check and serve until interrupted."""
    import uvicorn

    from mmpt.search.app import open_service

    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        warnings.warn(f"--host {args.host}: the service is reachable from other machines; it has no "
                      "authentication", stacklevel=1)
    app = open_service(args.model, args.index_dir, max_upload_bytes=int(args.max_upload_mb * 2**20),
                       k_max=args.k_max, max_batch=args.max_batch, allow_nonfinite=args.allow_nonfinite)
    print(f"serving {args.index_dir} on http://{args.host}:{args.port}/ (API docs: /docs); Ctrl-C stops", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
