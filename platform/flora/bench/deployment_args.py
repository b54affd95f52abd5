"""What every benchmark against a running deployment shares: where it is, who we are, whether
it is ready, and what its Serve config says."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flora.bench.serve import Deployment
    from flora.serve.config import ServeArgs


def add_deployment_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--url", default="http://127.0.0.1:8000", help="the deployment's HTTP address")
    s.add_argument("--admin-key", help="creates the tenants (default: $FLORA_ADMIN_KEY)")


def admin_key(args: argparse.Namespace) -> str | None:
    """``--admin-key`` or ``$FLORA_ADMIN_KEY``; None (and a message on stderr) when neither."""
    key = args.admin_key or os.environ.get("FLORA_ADMIN_KEY")
    if not key:
        print("error: give --admin-key or set FLORA_ADMIN_KEY", file=sys.stderr)
    return key


def connect(url: str, admin_key: str) -> tuple[Deployment | None, str]:
    """The deployment if ``/readyz`` answers 200, else None and why."""
    import httpx

    from flora.bench.serve import Deployment

    deployment = Deployment(url, admin_key)
    try:
        ready = httpx.get(deployment.url + "/readyz", timeout=30)
    except httpx.HTTPError as e:
        return None, f"cannot reach {deployment.url}: {e}"
    if ready.status_code != 200:
        return None, f"{deployment.url}/readyz answers {ready.status_code}: {ready.text[:300]}"
    return deployment, ""


def serve_args(config: Path) -> ServeArgs:
    """The first application's args in a Serve config (``deployments/*.yaml``)."""
    import yaml

    from flora.serve.config import ServeArgs

    doc = yaml.safe_load(config.read_text())
    return ServeArgs.model_validate(doc["applications"][0].get("args") or {})
