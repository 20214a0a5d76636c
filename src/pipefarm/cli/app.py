"""The ``pipefarm`` group itself: how every verb fails, and how a verb opens its run.

Every verb's ``--help`` has an example. User mistakes print one line on stderr and exit 2;
``pipefarm run`` exits 0 when every task succeeded and 1 when some did not. The verbs live in
the sibling modules, one per verb group; they register on :data:`main` when
``pipefarm.cli`` is imported::

    argv -> main (_Main.main) -> a verb (submit, run, status, ...) -> _open(RUN) -> Run
              |                                                           |
              +-- an expected error anywhere below: one stderr line, exit 2
                  (a damaged catalog: which one, from the run _open last opened)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .. import __version__

EXIT_FAILED_TASKS = 1
EXIT_USAGE = 2


def _die(msg: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"pipefarm: error: {msg}", err=True)
    sys.exit(code)


def _damaged(exc: Any) -> None:
    """A damaged catalog: what and where on one line, how to recover on a second."""
    click.echo(f"pipefarm: error: {exc.args[0]}", err=True)
    click.echo(f"pipefarm: hint: {exc.hint}", err=True)
    sys.exit(EXIT_USAGE)


#: the run directory the last ``_open`` opened: a damaged page found by a later query is
#: reported against its catalog
_opened: Path | None = None

#: verbs that only read a run: on a directory others can write they warn and go on, as long
#: as they unpickle nothing (``results`` decodes Python results, so it refuses when there are)
_READING_VERBS = frozenset({"status", "results", "failures", "logs", "list", "show", "report"})


def _holds_pickles(run: Any, verb: str) -> bool:
    """Whether ``verb`` would unpickle something from ``run``: ``results`` the results of
    succeeded tasks, ``show`` the arguments of Python tasks."""
    return run.store.has_python_tasks() if verb == "show" else run.store.has_results()


def _open(path: str) -> Any:
    """Open RUN for the verb being run: writing verbs refuse a directory others can write,
    reading verbs warn and proceed unless they would unpickle from it."""
    global _opened
    from ..run import Run

    ctx = click.get_current_context(silent=True)
    verb = ctx.info_name if ctx is not None else None
    _opened = Path(path)
    if verb not in _READING_VERBS:
        return Run.open(path)
    import warnings

    with warnings.catch_warnings(record=True) as said:  # said once we know we go on
        warnings.simplefilter("always")
        run = Run.open(path, readonly=True)
    if run.unsafe and verb in ("results", "show") and _holds_pickles(run, verb):
        from ..errors import UnsafeRun

        what = "results" if verb == "results" else "task arguments"
        run.close()
        raise UnsafeRun(f"{path} can be written by other users and holds Python {what}, "
                        f"which `pipefarm {verb}` would unpickle. Fix with: chmod go-w {path}")
    for w in said:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return run



def _shown(arg: str) -> str:
    """An argument as a printable literal: undecodable bytes as \\xNN."""
    return repr(arg.encode("utf-8", "surrogateescape"))[1:]



def _warning_line(message: Warning | str, category: type[Warning], *args: Any, **kw: Any) -> str:
    return f"pipefarm: warning: {message}\n"


class _Main(click.Group):
    """Turns expected errors into one line and exit status 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        import sqlite3
        import warnings

        from ..errors import CatalogDamaged, PipefarmError

        kwargs["standalone_mode"] = False
        warnings.formatwarning = _warning_line  # one line, as the errors are
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            _die("aborted", 130)
        except click.UsageError as exc:
            cmd = exc.ctx.command_path if exc.ctx else "pipefarm"
            _die(f"{exc.format_message()} (see: {cmd} --help)")
        except click.ClickException as exc:
            _die(exc.format_message())
        except CatalogDamaged as exc:
            _damaged(exc)
        except (PipefarmError, FileNotFoundError, FileExistsError, NotADirectoryError,
                PermissionError) as exc:
            _die(str(exc))
        except sqlite3.DatabaseError as exc:  # damage found past the open, by a query
            from ..store.sqlite import is_damage

            if not is_damage(exc):
                raise
            if _opened is None:  # a verb that opens runs itself (list): which one is unknown
                _die(f"a run's catalog is damaged ({exc}); nothing was changed. `pipefarm"
                     " status RUN` on each run says which, and how to recover it")
            _damaged(CatalogDamaged(str(_opened / "catalog.db"), str(exc)))
        except KeyError as exc:  # TemplateError and unknown ids
            _die(str(exc.args[0]) if exc.args else str(exc))
        except UnicodeEncodeError:
            # argv arrives surrogate-escaped: bytes that are not UTF-8 reached text storage
            from ..execute.template import has_surrogates

            bad = [a for a in sys.argv[1:] if has_surrogates(a)]
            if not bad:
                raise
            _die(f"argument {_shown(bad[0])} is not valid UTF-8")
        except BrokenPipeError:
            sys.exit(0)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
# the package's own __version__ (its one source), not the installed metadata, which an editable
# install leaves stale after a version bump
@click.version_option(version=__version__, prog_name="pipefarm")
def main() -> None:
    """Run large numbers of tasks in parallel, durably.

    \b
    A sweep over a CSV file, in four commands:
      pipefarm submit runs/sweep --from-csv params.csv -- ./simulate --alpha {alpha} --beta {beta}
      pipefarm run runs/sweep --workers 8
      pipefarm status runs/sweep
      pipefarm results runs/sweep --format parquet -o results.parquet

    Every result is on disk as soon as its task ends: stop at any time (Ctrl-C, a crash, a
    walltime kill) and `pipefarm run` again resumes what is left.
    """
