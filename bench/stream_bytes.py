"""Bytes on the wire to the browser for a streamed answer: dspex_nb's stream view against a hand-rolled
``ipywidgets.HTML`` field that is set to the whole text on every tick (what a user would write, and what
this view did before it sent deltas), at 1,000, 5,000 and 20,000 tokens, in one real kernel.

Run ``python bench/stream_bytes.py``. It prints the widget-message bytes per 1,000 tokens of each and their
ratio: flat for deltas, growing with the length for the whole-text field. Both views are refreshed 10
times a second from the same kind of run (demo LM, 0.2 ms per token).
"""

from __future__ import annotations

import json
import os
import time

from jupyter_client.manager import KernelManager

TOKENS = (1_000, 5_000, 20_000)
PEER = """
import ipywidgets, time
from IPython.display import display
field = ipywidgets.HTML(); display(field)
run = pool.run_stream("question -> answer", question="peer {n}")
while not run.wait(0.1):
    field.value = "".join(c["text"] for c in run.read(0)[0] if c.kind == "token")
field.value = "".join(c["text"] for c in run.read(0)[0] if c.kind == "token")
"""


def comm_bytes(kc, code: str) -> int:
    """Bytes of the comm messages (widget updates) a cell sends until it is idle."""
    msg_id, total = kc.execute(code), 0
    deadline = time.monotonic() + 300
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "comm_msg":
            total += len(json.dumps(msg["content"]))
        elif msg["msg_type"] == "error":
            raise RuntimeError(msg["content"]["evalue"])
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return total


def main() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DSPEX_NONINTERACTIVE"}
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        for code in ("%load_ext dspex_nb", "%dspex start -n 1", "from dspex_nb.magics import notebook_pool\n"
                     "pool = notebook_pool()"):
            comm_bytes(kc, code)
        print(f"{'tokens':>8}  {'dspex_nb B/1k tok':>18}  {'whole-text HTML B/1k tok':>25}  {'ratio':>6}")
        for n in TOKENS:
            comm_bytes(kc, f"%dspex lm demo --set answer_tokens={n} --set per_token=0.0002")
            ours = comm_bytes(kc, f'%%dspex predict "question -> answer"\nours {n}')
            peer = comm_bytes(kc, PEER.format(n=n))
            print(f"{n:>8,}  {ours * 1000 / n:>18,.0f}  {peer * 1000 / n:>25,.0f}  {ours / peer:>6.3f}x")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


if __name__ == "__main__":
    main()
