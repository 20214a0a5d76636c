"""``pipefarm cache stats|list|clear``: look into the result cache and clean it."""

from __future__ import annotations

import re
import time
from typing import Any

import click

from .app import main
from .submit import _human_bytes as _size

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class _Age(click.ParamType):
    """An age: a number and a unit, ``30d``, ``12h``, ``90m``, ``45s``, ``2w``."""

    name = "age"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
        if m is None:
            self.fail(f"{value!r} is not an age such as 30d, 12h, 90m, 45s or 2w", param, ctx)
        return float(m.group(1)) * _UNITS[m.group(2)]


_dir_option = click.option(
    "--cache-dir", metavar="DIR",
    help="The cache directory (default: $PIPEFARM_CACHE, else ~/.cache/pipefarm).")
_age_option = click.option("--older-than", type=_Age(), metavar="AGE",
                           help="Only entries written longer ago than AGE (30d, 12h, 90m).")
_name_option = click.option("--function", "function", metavar="NAME",
                            help="Only entries of this function (module.name or name) or"
                                 " command (its program).")


def _open(cache_dir: str | None) -> Any:
    from ..cache.entries import ResultCache

    return ResultCache(cache_dir)


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@main.group()
def cache() -> None:
    """The result cache that `submit --cache` and `run.map(..., cache=True)` use.

    \b
      pipefarm cache stats                          # entries, sizes, damage found
      pipefarm cache list --function simulate       # one line per entry
      pipefarm cache clear --older-than 30d         # entries written more than 30 days ago
      pipefarm cache clear --function simulate      # every entry of one function
      pipefarm cache clear                          # everything
    """


@cache.command()
@_dir_option
def stats(cache_dir: str | None) -> None:
    """Entries, sizes, oldest and newest entry, damaged records skipped, entries by name.

    \b
      pipefarm cache stats --cache-dir /scratch/me/pfcache
    """
    with _open(cache_dir) as c:
        s = c.stats()
    click.echo(f"cache     {s.path}")
    click.echo(f"entries   {s.entries:,}")
    click.echo(f"packs     {s.packs:,} ({_size(s.pack_bytes)})")
    click.echo(f"blobs     {s.blobs:,} ({_size(s.blob_bytes)})")
    click.echo(f"oldest    {_when(s.oldest)}")
    click.echo(f"newest    {_when(s.newest)}")
    click.echo(f"damaged   {s.damaged_records:,} record(s) skipped (checksum),"
               f" {s.torn_bytes:,} byte(s) of incomplete records")
    for name, n in sorted(s.by_name.items(), key=lambda kv: -kv[1]):
        click.echo(f"  {n:>10,}  {name}")


@cache.command("list")
@_dir_option
@_age_option
@_name_option
def list_(cache_dir: str | None, older_than: float | None, function: str | None) -> None:
    """One line per entry: when it was written, its result's size, its name, its key.

    \b
      pipefarm cache list --function simulate --older-than 7d
    """
    cut = None if older_than is None else time.time() - older_than
    with _open(cache_dir) as c:
        for e in c.entries():
            if cut is not None and e.written_at >= cut:
                continue
            if function is not None and function not in (e.name, e.name.rsplit(".", 1)[-1]):
                continue
            click.echo(f"{_when(e.written_at)}  {_size(e.size):>9}  {e.name}  {e.key.hex()[:16]}")


@cache.command()
@_dir_option
@_age_option
@_name_option
def clear(cache_dir: str | None, older_than: float | None, function: str | None) -> None:
    """Remove entries (all of them, or those matching every option given); their tasks are
    computed again next time.

    \b
      pipefarm cache clear --older-than 30d
      pipefarm cache clear --function mymodule.simulate
    """
    with _open(cache_dir) as c:
        removed = c.clear(older_than, function)
        left = len(c.index)
    click.echo(f"removed {removed:,} entr{'y' if removed == 1 else 'ies'} from {c.path};"
               f" {left:,} left")
