"""``kvquant assets``: fetch the offline model and text into the asset cache."""

from __future__ import annotations


def cmd_assets(args) -> None:
    from kvquant.io import assets

    if args.list:
        if args.force or args.names:
            raise ValueError("--list only lists the asset names: drop --force and the names, or --list")
        for name, desc in assets.list_assets().items():
            print(f"{name:20s} {desc}")
        return
    for name, path in assets.fetch_all(args.names or None, force=args.force).items():
        print(f"{name}: {path}")
