"""``python -m dspex_nb demo | doctor [--python EXE]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    called = Path(sys.argv[0]).name  # "dspex-nb" from the console script
    parser = argparse.ArgumentParser(prog="python -m dspex_nb" if called == "__main__.py" else called)
    commands = parser.add_subparsers(dest="command", required=True)
    doctor_cmd = commands.add_parser("doctor", help="report whether grpcio, protobuf and dspy are usable")
    doctor_cmd.add_argument("--python", help="also check this worker interpreter")
    demo_cmd = commands.add_parser("demo", help="stream a batch and a token stream from a pool on the demo LM")
    demo_cmd.add_argument("-n", "--workers", type=int, default=2)
    demo_cmd.add_argument("--items", type=int, default=20)
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from dspex_nb.doctor import doctor

        return 0 if doctor(args.python) else 1
    from dspex_nb.demo import run_demo
    from dspex_nb.pool.settings import SettingError

    try:
        return run_demo(workers=args.workers, items=args.items)
    except SettingError as exc:  # -n 0: a usage error, not a traceback
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
