"""What a Ray actor is started with: keys as arguments of its constructor, never in its ``runtime_env``, which Ray's
dashboard shows to whoever can open it. Checked on the backend's own spawn, with Ray's actor handle stood in for (no
cluster starts)."""

from __future__ import annotations

import os
from typing import Any

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install 'ray>=2.40'")

from dspex_nb.pool.connection import WorkerSpec  # noqa: E402
from dspex_nb.pool.ray_backend import KERNEL_VARIABLES, RayBackend  # noqa: E402


class ActorClass:
    """Stands in for ``ray.remote(RayWorker)``: records the options and the constructor's arguments."""

    def options(self, **options: Any) -> ActorClass:
        self.given = options
        return self

    def remote(self, *args: Any) -> object:
        self.args = args
        return object()


def test_keys_given_in_pool_env_are_not_in_the_runtime_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-kernel-0123456789")
    backend = RayBackend(None, None, 8)
    backend._actor = actor = ActorClass()
    env = {"ANTHROPIC_API_KEY": "sk-ant-0123456789", "OPENAI_API_KEY": "sk-pool-0123456789", "MODE": "fast",
           "RAY_AUTH_TOKEN": "ray-own-token"}
    backend.spawn("w0", 0, WorkerSpec("0123456789ab", "demo", {}, 2**20, 60.0, None, 10.0, env))
    shown = actor.given["runtime_env"]["env_vars"]
    kernel = {name: os.environ[name] for name in KERNEL_VARIABLES if name in os.environ}  # DSPY_CACHEDIR...
    assert shown == {"MODE": "fast", "RAY_AUTH_TOKEN": "ray-own-token", **kernel}  # Ray's own stay as Ray reads them
    secrets = actor.args[-2]  # (the last: the kernel's working directory)
    assert secrets["ANTHROPIC_API_KEY"] == "sk-ant-0123456789"
    assert secrets["OPENAI_API_KEY"] == "sk-pool-0123456789"  # Pool(env=...) wins over the kernel's, as it says
