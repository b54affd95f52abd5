"""``flora k8s render [--check]``: the RayService's serveConfigV2 files, from deployments/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _render(args: argparse.Namespace) -> int:
    import yaml

    from flora.k8s.render import TARGETS, render

    try:
        outcomes = render(Path(args.root), TARGETS, check=args.check)
    except (OSError, ValueError, yaml.YAMLError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for outcome in outcomes:
        print(f"{outcome.status:9}  {outcome.target.output}  ← {outcome.target.source}")
    drifted = [o for o in outcomes if o.status in ("stale", "missing")]
    for outcome in drifted:
        print(outcome.diff, file=sys.stderr)
    if drifted:
        print(
            f"error: {len(drifted)} file(s) differ from deployments/; run `flora k8s render`",
            file=sys.stderr,
        )
        return 1
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    k8s = commands.add_parser("k8s", help="Kubernetes (KubeRay) manifests in k8s/")
    k8s_commands = k8s.add_subparsers(dest="k8s", required=True)
    r = k8s_commands.add_parser(
        "render",
        help="write each overlay's serve-config.yaml (the RayService's serveConfigV2)",
        description="Write k8s/overlays/*/serve-config.yaml, the kustomize patches that set the "
        "RayService's serveConfigV2, from the Serve config files in deployments/ (validated with "
        "Ray Serve's ServeDeploySchema and ServeArgs). --check writes nothing and exits 1 when a "
        "committed file differs.",
    )
    r.add_argument("--check", action="store_true", help="write nothing; exit 1 on any difference")
    r.add_argument("--root", default=".", help="the repository root (default: .)")
    r.set_defaults(handler=_render)
