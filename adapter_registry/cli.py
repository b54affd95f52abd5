"""``flora adapters …``, ``flora tenants create`` and ``flora registry serve``.

The client commands talk to a running registry (``--url`` or ``FLORA_REGISTRY_URL``) with a key
(``--key``, or ``FLORA_API_KEY``; admin commands fall back to ``FLORA_ADMIN_KEY``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from adapter_registry.errors import RegistryError
from adapter_registry.records import AdapterRecord

DEFAULT_URL = "http://127.0.0.1:8000"


def _client(args: argparse.Namespace, *, admin: bool = False):
    from adapter_registry.client import RegistryClient

    key = args.key or os.environ.get("FLORA_API_KEY")
    if admin:
        key = args.key or os.environ.get("FLORA_ADMIN_KEY")
    return RegistryClient(args.url or os.environ.get("FLORA_REGISTRY_URL") or DEFAULT_URL, key)


def _table(records: list[AdapterRecord]) -> str:
    rows = [("ADAPTER", "KIND", "RANK", "LANGUAGE", "USER", "BASE MODEL", "SIZE", "SHA256")]
    for r in records:
        name = r.label if r.tenant != "_global" else f"{r.label} (public)"
        rows.append(
            (
                name,
                r.kind.value,
                str(r.rank),
                r.language or "-",
                r.user or "-",
                r.base_model,
                f"{r.size / 1024:.0f} KiB",
                r.sha256[:12],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    ).rstrip()


def _print_records(records: list[AdapterRecord], as_json: bool) -> None:
    if as_json:
        print(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
    elif records:
        print(_table(records))
    else:
        print("no adapters")


def _register(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.directory.startswith("s3://"):
            meta = {"language": args.language, "user": args.user, "base_model": args.base_model}
            record = client.import_uri(args.directory, args.name, **meta)
        else:
            record = client.register(
                args.directory,
                args.name,
                language=args.language,
                user=args.user,
                base_model=args.base_model,
                description=args.description,
            )
    _print_records([record], args.json)
    return 0


def _list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        records = client.list(
            user=args.user, language=args.language, kind=args.kind, include_global=args.all
        )
    _print_records(records, args.json)
    return 0


def _show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_records(client.show(args.ref), args.json)
    return 0


def _delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for adapter_id in client.delete(args.ref):
            print(f"deleted {adapter_id}")
    return 0


def _resolve(args: argparse.Namespace) -> int:
    with _client(args) as client:
        resolution = client.resolve(adapter=args.adapter, user=args.user, language=args.language)
    if args.json:
        print(resolution.model_dump_json(indent=2))
    else:
        print(f"{resolution.rule}: {resolution.reason}")
    return 0


def _create_tenant(args: argparse.Namespace) -> int:
    with _client(args, admin=True) as client:
        tenant, key = client.create_tenant(args.name)
    if args.json:
        print(json.dumps({"tenant": tenant.name, "api_key": key}))
    else:
        print(f"created tenant {tenant.name}\nAPI key (shown once, store it now): {key}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from adapter_registry.app import create_app
    from adapter_registry.settings import RegistrySettings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = RegistrySettings.from_env()
    registry = settings.build()
    print(f"adapter registry on http://{args.host}:{args.port} — {settings.describe()}")
    if not settings.admin_key:
        print(f"admin key: FLORA_ADMIN_KEY is unset; read it from {settings.admin_key_path}")
    uvicorn.run(create_app(registry), host=args.host, port=args.port, log_level="info")
    return 0


def _guard(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Registry errors become one line on stderr and exit status 1, not a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except RegistryError as e:
            print(f"error: {e.message}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return run


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"registry URL (FLORA_REGISTRY_URL, default {DEFAULT_URL})")
    parser.add_argument("--key", help="API key (default: FLORA_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    adapters = commands.add_parser("adapters", help="register, list, show, delete adapters")
    sub = adapters.add_subparsers(dest="adapters_command", required=True)

    p = sub.add_parser("register", help="upload an adapter directory (or import an s3:// prefix)")
    p.add_argument("directory", help="adapter_config.json + adapter_model.safetensors, or s3://…")
    p.add_argument("--name", required=True)
    p.add_argument("--language", help="e.g. python: used by per-language resolution")
    p.add_argument("--user", help="the end user this adapter belongs to")
    p.add_argument("--base-model", help="default: base_model_name_or_path in the config")
    p.add_argument("--description", default="")
    _connection(p)
    p.set_defaults(handler=_guard(_register))

    p = sub.add_parser("list", help="newest version of each of your adapters")
    p.add_argument("--user")
    p.add_argument("--language")
    p.add_argument("--kind", choices=["flora", "lora", "ia3"])
    p.add_argument("--all", action="store_true", help="include public adapters")
    _connection(p)
    p.set_defaults(handler=_guard(_list))

    for name, help_text, handler in (
        ("show", "every version of NAME (or just NAME@VERSION)", _show),
        ("delete", "delete NAME@VERSION, or every version of NAME", _delete),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("ref", metavar="NAME[@VERSION]")
        _connection(p)
        p.set_defaults(handler=_guard(handler))

    p = sub.add_parser("resolve", help="which adapter a request would use, and why")
    p.add_argument("--adapter")
    p.add_argument("--user")
    p.add_argument("--language")
    _connection(p)
    p.set_defaults(handler=_guard(_resolve))

    tenants = commands.add_parser("tenants", help="manage tenants (admin key)")
    tsub = tenants.add_subparsers(dest="tenants_command", required=True)
    p = tsub.add_parser("create", help="create a tenant and print its API key once")
    p.add_argument("name")
    _connection(p)
    p.set_defaults(handler=_guard(_create_tenant))

    registry = commands.add_parser("registry", help="run the adapter registry")
    rsub = registry.add_subparsers(dest="registry_command", required=True)
    p = rsub.add_parser(
        "serve",
        help="serve the registry REST API standalone",
        description="Configured by FLORA_ADMIN_KEY, FLORA_REDIS_URL, FLORA_STORE_URL, "
        "FLORA_DATA_DIR and AWS_* (see README); with none set it runs on local files.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(handler=_guard(_serve))
