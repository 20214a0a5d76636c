"""Command templates (kind ``cmd``): the :class:`Command` record, its placeholders, rendering.

A :class:`Command` is the template every task of a group shares (stored as ``Spec.payload``,
see :func:`encode_command`); each task carries only its placeholder values (stored as the
task's args, see :func:`encode_values`). At run time :func:`render` and :func:`render_cwd`
turn the two into the argv and working directory of one attempt::

    Command (Spec.payload) ─┐
                            ├─> render() / render_cwd() ─> argv, cwd ─> cmd.run_command
    values (task args)  ────┘

Nothing here starts a process: running an attempt is :mod:`pipefarm.execute.cmd`'s job.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from functools import lru_cache

import msgspec

#: Bytes of stdout and of stderr captured per attempt unless the Command says otherwise.
DEFAULT_OUTPUT_CAP = 1 << 20


class TemplateError(KeyError):
    """A command template that cannot be rendered: a missing value or bad placeholder syntax."""

    def __str__(self) -> str:  # KeyError would show repr() of the message, quotes and all
        return str(self.args[0]) if self.args else ""


class Command(msgspec.Struct, omit_defaults=True):
    """The template of a command task: an argv list or a shell line, plus how to run it.

    Placeholders are ``{name}`` (an identifier), ``{N}`` (digits) and ``{}`` (the only value
    of a single-column source), and may carry a format spec applied to the value as a number
    when it looks like one (``{index:05d}``). Any other brace is literal, so shell and awk
    text needs no escaping (``awk '{print $1}'``, ``{ echo x; exit 7; }``); a ``{`` right
    after ``$`` is always literal (the shell's ``${VAR}``); ``{{`` and ``}}`` are one literal
    brace each (so write awk's ``}}`` as ``} }``).
    In ``argv`` mode a value becomes part of exactly one argv element; no shell is involved.
    In ``shell`` mode each value is quoted with :func:`shlex.quote` before it goes into the
    line, which runs under ``/bin/sh -c`` -- so do not put placeholders inside quotes there.
    ``cwd`` may contain placeholders too (a per-task working directory); ``env`` is literal.
    """

    argv: list[str] | None = None
    shell: str | None = None
    cwd: str | None = None
    env: dict[str, str] = {}
    output_cap: int = DEFAULT_OUTPUT_CAP
    output_per_task: bool = False

    def __post_init__(self) -> None:
        if (self.argv is None) == (self.shell is None):
            raise ValueError("a Command needs exactly one of argv and shell")
        if self.argv is not None and not self.argv:
            raise ValueError("a Command's argv must not be empty")
        if self.output_cap < 0:
            raise ValueError("output_cap must be >= 0 bytes")



# -- encoding ------------------------------------------------------------------------------

_cmd_encoder = msgspec.msgpack.Encoder()
_cmd_decoder = msgspec.msgpack.Decoder(Command)
_values_decoder = msgspec.msgpack.Decoder()  # str values, or bytes ones (see encode_values)


def encode_command(cmd: Command) -> bytes:
    """Serialise a Command template (what ``Spec.payload`` holds for kind ``cmd``)."""
    return _cmd_encoder.encode(cmd)


def decode_command(blob: bytes) -> Command:
    """Inverse of :func:`encode_command`."""
    return _cmd_decoder.decode(blob)


def encode_values(values: dict[str, str]) -> bytes:
    """Serialise one task's placeholder values (what a ``cmd`` task's args hold)."""
    try:
        return _cmd_encoder.encode(values)
    except UnicodeEncodeError:
        # Values read from files with undecodable bytes carry surrogate escapes (file names
        # on POSIX are bytes); store those values as bytes so they reach argv byte-exact.
        return _cmd_encoder.encode(
            {
                k: (v.encode("utf-8", "surrogateescape") if has_surrogates(v) else v)
                for k, v in values.items()
            }
        )


def decode_values(blob: bytes | None) -> dict[str, str]:
    """Inverse of :func:`encode_values`."""
    if not blob:
        return {}
    values = _values_decoder.decode(blob)
    if not isinstance(values, dict):
        raise ValueError("not encoded placeholder values")
    for k, v in values.items():
        if isinstance(v, bytes):
            values[k] = v.decode("utf-8", "surrogateescape")
        elif not isinstance(v, str):
            raise ValueError(f"placeholder value for {k!r} is not a string")
    return values


def has_surrogates(s: str) -> bool:
    """Whether ``s`` carries bytes that are not UTF-8 (as surrogate escapes, from argv or a file)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# -- templates -----------------------------------------------------------------------------

# What a placeholder is: {name}, {name:spec}, {N} or {} -- name an identifier, N digits, spec
# without braces. Every other brace is literal text, so ordinary shell and awk need no
# escaping: awk '{print $1}', ${HOME}, { cmd; exit 7; }. A "{" right after "$" is always
# literal (the shell's ${VAR}); "{{" and "}}" still stand for one literal brace.
_PLACEHOLDER = re.compile(r"\{(?:([^\W\d]\w*|\d+)(?::([^{}]*))?)?\}")
_BRACE = re.compile(r"[{}]")


@lru_cache(maxsize=4096)
def _parse(template: str) -> tuple[tuple[str, str | None, str], ...]:
    """``(literal, field or None, format spec)`` pieces of one template string (cached).

    ``field`` is the placeholder's name, or ``""`` for ``{}`` (the source's only value).
    Never raises: text that is not a placeholder is literal.
    """
    out: list[tuple[str, str | None, str]] = []
    literal: list[str] = []
    i, n = 0, len(template)
    while i < n:
        j = _next_brace(template, i)
        literal.append(template[i:j])
        if j >= n:
            break
        c = template[j]
        if template.startswith(c * 2, j):  # "{{" / "}}": one literal brace
            literal.append(c)
            i = j + 2
            continue
        m = _PLACEHOLDER.match(template, j) if c == "{" and template[j - 1 : j] != "$" else None
        if m is None:
            literal.append(c)
            i = j + 1
            continue
        out.append(("".join(literal), m.group(1) or "", m.group(2) or ""))
        literal = []
        i = m.end()
    if literal or not out:
        out.append(("".join(literal), None, ""))
    return tuple(out)


def _next_brace(s: str, start: int) -> int:
    m = _BRACE.search(s, start)
    return len(s) if m is None else m.start()


def _unparse(pieces: Iterable[tuple[str, str | None, str]]) -> str:
    """The template text of parsed pieces (literal braces doubled): ``_parse`` inverts it."""
    out = []
    for literal, field, spec in pieces:
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is not None:
            out.append("{" + field + (":" + spec if spec else "") + "}")
    return "".join(out)


def templates(cmd: Command) -> list[str]:
    """The template strings of a Command: argv elements or the shell line, then cwd."""
    return _templates(cmd)


def _templates(cmd: Command) -> list[str]:
    parts = list(cmd.argv) if cmd.argv is not None else [cmd.shell or ""]
    if cmd.cwd is not None:
        parts.append(cmd.cwd)
    return parts


def placeholders(cmd: Command) -> set[str]:
    """The placeholder names a Command uses (argv or shell line, and cwd)."""
    names: set[str] = set()
    for template in _templates(cmd):
        for _, field, _ in _parse(template):
            if field is not None:
                names.add(field)
    return names


def _apply_spec(value: str, spec: str) -> str:
    try:
        return format(value, spec)
    except ValueError:
        pass
    # "{index:05d}" on the string "7": format it as the number it spells
    for conv in (int, float):
        try:
            return format(conv(value), spec)
        except ValueError:
            continue
    raise TemplateError(f"cannot format value {value!r} with format spec {spec!r}")


def _value(field: str, values: dict[str, str]) -> str | None:
    """The value of one placeholder: ``{}`` is the row's only value (or its ``""`` entry)."""
    if field in values:
        return values[field]
    if field == "" and len(values) == 1:
        return next(iter(values.values()))
    return None


def _render(template: str, values: dict[str, str], quote: bool) -> str:
    pieces = _parse(template)
    if len(pieces) == 1 and pieces[0][1] is None:
        return pieces[0][0]  # no placeholder: the common case for most argv elements
    out = []
    for literal, field, spec in pieces:
        out.append(literal)
        if field is None:
            continue
        value = _value(field, values)
        if value is None:
            raise _missing(template, values)
        if spec:
            value = _apply_spec(value, spec)
        out.append(shlex.quote(value) if quote else value)
    return "".join(out)


def _missing(template: str, values: dict[str, str]) -> TemplateError:
    names = {f for _, f, _ in _parse(template) if f is not None}
    missing = sorted(f for f in names if _value(f, values) is None)
    have = ", ".join("{" + k + "}" for k in sorted(values)) or "none"
    extra = f"; {EMPTY_PLACEHOLDER_HINT}" if "" in missing else ""
    return TemplateError(
        f"no value for placeholder {', '.join('{' + m + '}' for m in missing)} "
        f"in {template!r}; available: {have}{extra}"
    )


#: Why ``{}`` found no value: it stands for a source's only column.
EMPTY_PLACEHOLDER_HINT = (
    "{} stands for the only value of a single-column source (--array, --from-file, a "
    "one-column CSV, one ::: list); name the column instead, e.g. {index}"
)


def literal_braces(cmd: Command) -> set[str]:
    """The texts in literal braces of a Command's templates: ``{my-col}`` gives ``my-col``.

    Such text is not a placeholder (names are identifiers); when it names a source column
    the user most likely meant it as one, and :func:`pipefarm.sources.check_template` says so.
    """
    found: set[str] = set()
    for template in _templates(cmd):
        # not after "{" or "$" and not before "}": {{x}} and ${x} are meant literally
        found.update(re.findall(r"(?<![{$])\{([^{}:]+)(?::[^{}]*)?\}(?!\})", template))
    return found


def name_default(cmd: Command, name: str) -> Command:
    """``cmd`` with every ``{}`` (spec kept) written as ``{name}``: for a source whose only
    column is ``name``, so the stored template says what it uses."""

    def fix(template: str) -> str:
        pieces = _parse(template)
        if not any(f == "" for _, f, _ in pieces):
            return template
        return _unparse((lit, name if f == "" else f, spec) for lit, f, spec in pieces)

    argv = None if cmd.argv is None else [fix(a) for a in cmd.argv]
    shell = None if cmd.shell is None else fix(cmd.shell)
    cwd = None if cmd.cwd is None else fix(cmd.cwd)
    return msgspec.structs.replace(cmd, argv=argv, shell=shell, cwd=cwd)


def render(cmd: Command, values: dict[str, str]) -> list[str]:
    """The argv to execute for one task: placeholders replaced by ``values``.

    argv mode substitutes into each element separately; shell mode substitutes quoted values
    into the line and returns ``["/bin/sh", "-c", line]``. Raises :class:`TemplateError`.
    """
    if cmd.argv is not None:
        return [_render(a, values, False) for a in cmd.argv]
    return ["/bin/sh", "-c", _render(cmd.shell or "", values, True)]


def render_cwd(cmd: Command, values: dict[str, str]) -> str | None:
    """The working directory for one task (placeholders replaced, not quoted), or None."""
    return None if cmd.cwd is None else _render(cmd.cwd, values, False)
