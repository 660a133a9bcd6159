"""Entry point of a worker process: ``python -m dspex_nb.worker --address unix:/path/w0.sock``.

Dependencies are checked before anything imports them: a missing one is printed as a
machine-readable report on stderr and the process exits with code 3.
The worker exits by itself when its stdin closes (its parent died, even by SIGKILL). Its LM settings
come as JSON in $DSPEX_LM_KWARGS, not on the command line, which any local user can read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dspex_nb import deps
from dspex_nb.wire import EXIT_MISSING_DEPENDENCIES, LM_KWARGS_ENV
from dspex_nb.worker.output import spare_output
from dspex_nb.worker.stdin import take_stdin


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dspex_nb.worker")
    parser.add_argument("--address", required=True, help="unix:/path/to.sock")
    parser.add_argument("--worker-id", default="w0")
    parser.add_argument("--run-id", default="")
    parser.add_argument("--lm", default="demo", help="'demo' or any dspy.LM model string")
    parser.add_argument("--max-message-mb", type=int, default=64)
    parser.add_argument("--rate-limit", type=float, default=None, help="LM requests per minute, at most")
    parser.add_argument("--session-ttl", type=float, default=3600.0,
                        help="seconds a session's objects live unused")
    parser.add_argument("--threads", type=int, default=32, help="gRPC server threads")
    parser.add_argument("--no-parent-watch", action="store_true",
                        help="do not exit when stdin closes (for running a worker by hand)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parent = take_stdin()  # first: before anything opens a file that could become file 0
    spare_output()  # a print to a log on a full disk fails no call
    # dspy imports jsonschema, which builds an IRI grammar at import when rfc3987-syntax is installed (as
    # JupyterLab installs it): about 0.8 s of every worker start, for a format check DSPy never uses.
    sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]
    statuses = deps.report()  # imports grpc, protobuf and dspy
    if not all(s.ok for s in statuses):
        print(deps.MISSING_MARKER + deps.as_json(statuses), file=sys.stderr, flush=True)
        return EXIT_MISSING_DEPENDENCIES
    from dspex_nb.worker.main import serve

    return serve(args.address, worker_id=args.worker_id, run_id=args.run_id, lm=args.lm,
                 lm_kwargs=json.loads(os.environ.get(LM_KWARGS_ENV) or "{}"), max_message_mb=args.max_message_mb,
                 rate_limit=args.rate_limit, session_ttl=args.session_ttl, threads=args.threads,
                 parent=parent, watch_parent=not args.no_parent_watch)


if __name__ == "__main__":
    sys.exit(main())
