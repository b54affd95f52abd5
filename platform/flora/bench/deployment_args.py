"""The arguments every benchmark against a running deployment takes: where it is, who we are."""

from __future__ import annotations

import argparse
import os
import sys


def add_deployment_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--url", default="http://127.0.0.1:8000", help="the deployment's HTTP address")
    s.add_argument("--admin-key", help="creates the tenants (default: $FLORA_ADMIN_KEY)")


def admin_key(args: argparse.Namespace) -> str | None:
    """``--admin-key`` or ``$FLORA_ADMIN_KEY``; None (and a message on stderr) when neither."""
    key = args.admin_key or os.environ.get("FLORA_ADMIN_KEY")
    if not key:
        print("error: give --admin-key or set FLORA_ADMIN_KEY", file=sys.stderr)
    return key
