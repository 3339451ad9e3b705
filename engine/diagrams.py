"""State diagrams generated from the lifecycle machine: Mermaid, DOT, SVG and PNG.

``PaymentLifecycle`` (compiled into ``machine.TABLE``) is the only input: every state,
edge, guard and timer drawn here is read from it, so the documentation in
``diagrams/`` cannot drift from the code.  ``tests/test_diagrams.py`` regenerates the
text forms and fails when the committed files are stale.

Three kinds of diagram share one model (``Diagram``: states, edges, notes):

- ``lifecycle()``: the canonical machine; timers are named by their ``TimerPolicy``
  field (``expires_at = now + preview_ttl``);
- ``provider(name)``: the transitions one provider supports (its driver's
  ``capabilities``), timers with the driver's values (``expires_at += 10 min``), and
  the provider call behind each edge (the driver's ``calls``), ``local`` for events
  the engine performs alone, and the deferred deliveries a commit enqueues;
- ``transaction(tx, journal)``: the path one transaction took, highlighted on the
  lifecycle, with the time of each step and its refused or unknown provider calls.

Edge labels read like UML transitions, ``event [guard] / effect``; the guard and
effect text comes from ``GUARD_LABELS`` / ``EFFECT_LABELS``, one template per function
the machine names (a test fails when the machine gains one without a label).

Mermaid and DOT are plain text, written here without any dependency; SVG and PNG come
from Graphviz's ``dot`` program (``ensure_dot``).  Output is deterministic: the same
machine and drivers give the same bytes.

Regenerate the committed files with ``make diagrams`` (``python -m txengine.diagrams
--write diagrams``); print one with ``txengine diagram --provider cheers --format dot``.
"""

from __future__ import annotations

import argparse
import html
import importlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import attrs

from . import machine
from .codec import decode_time
from .machine import TimerPolicy

# --- labels: one template per guard and effect the machine names --------------------------
# ``{field}`` placeholders are ``TimerPolicy`` fields: the lifecycle shows the field's
# name, a provider's diagram its value ("10 min").

GUARD_LABELS: Mapping[str, str] = {
    "before_preview_deadline": "now < expires_at",
    "has_outstanding": "outstanding > 0",
    "before_refund_deadline": "before finalized_at + {refund_window}",
    "preview_deadline_passed": "now >= expires_at",
}

EFFECT_LABELS: Mapping[str, str] = {
    "start_preview_clock": "expires_at = now + {preview_ttl}",
    "extend_preview": "expires_at += {update_extension}",
    "open_refund_window": "refund_deadline = now + {refund_window}",
}

#: drivers whose diagrams are generated, by provider name (``module:Class``)
DRIVERS: Mapping[str, str] = {
    "cheers": "txengine.providers.cheers:CheersDriver",
    "rekonect": "txengine.providers.rekonect:RekonectDriver",
    "forloy": "txengine.providers.forloy:ForloyDriver",
    "secuconnect": "txengine.providers.secuconnect:SecuconnectDriver",
    "reference": "txengine.providers.reference:ReferenceDriver",
}

FORMATS = ("mermaid", "dot", "svg", "png")
GENERATED = "Generated from engine/machine.py by `make diagrams`: do not edit."

GRAPHVIZ_HELP = (
    "Graphviz's `dot` program renders SVG and PNG and is not installed.\n"
    "  Debian/Ubuntu: sudo apt-get install graphviz    macOS: brew install graphviz\n"
    "  (`make diagrams` installs it itself when run as root with apt-get.)\n"
    "Mermaid and DOT text need nothing extra: --format mermaid or --format dot."
)


class GraphvizMissing(RuntimeError):
    """``dot`` is needed for SVG or PNG and could not be found or installed."""


# --- the model ------------------------------------------------------------------------------


@attrs.frozen
class Mark:
    """One journal entry drawn on an edge: ``step`` (a transition taken), or a provider
    call for the edge's event that was ``rejected`` or whose outcome is ``unknown``."""

    seq: int  # the journal's order
    kind: str
    text: str


@attrs.frozen
class Edge:
    """One transition as drawn, with its label in parts (each format lays them out)."""

    source: str
    target: str
    event: str
    #: the guard, shown in brackets: ``now < expires_at``
    guard: str = ""
    #: the timer effect, shown after a slash: ``refund_deadline = now + 24 h``
    effect: str = ""
    #: the provider calls the event makes, or ``("local",)``
    calls: tuple[str, ...] = ()
    #: ``(kind, call)`` of each delivery the commit enqueues, sent later and retried
    deferred: tuple[tuple[str, str], ...] = ()
    #: what a transaction did along this edge: steps taken, attempts refused or in doubt
    marks: tuple[Mark, ...] = ()
    #: ``normal``; in a transaction's diagram ``taken``, ``tried`` (attempts only) or ``idle``
    style: str = "normal"

    @property
    def head(self) -> str:
        """``finalize [now < expires_at]``: the event and its guard, as UML writes them."""
        return self.event + (f" [{self.guard}]" if self.guard else "")

    def text_lines(self) -> tuple[str, ...]:
        """The whole label as plain lines."""
        return (
            (self.head,)
            + ((f"/ {self.effect}",) if self.effect else ())
            + self.calls
            + tuple(f"then deferred {kind} via {call}" for kind, call in self.deferred)
            + tuple(mark.text for mark in self.marks)
        )


@attrs.frozen
class Note:
    """Text pinned to a state: an unsupported event, or journal entries no edge explains."""

    state: str
    lines: tuple[str, ...]
    #: ``info`` or ``unknown``
    kind: str = "info"


@attrs.frozen
class Diagram:
    """What every format draws: the machine's states, these edges, these notes."""

    name: str
    title: str
    edges: tuple[Edge, ...]
    notes: tuple[Note, ...] = ()
    #: a transaction's diagram: the states it visited, and where it is now
    visited: frozenset[str] = frozenset()
    current: str | None = None
    #: a comment in the text forms: where the diagram comes from
    origin: str = GENERATED

    initial = machine.INITIAL
    terminal = machine.TERMINAL

    @property
    def states(self) -> tuple[str, ...]:
        """The states drawn: those an edge reaches (a provider may reach fewer), and ``new``."""
        reached = {edge.target for edge in self.edges} | {self.initial}
        return tuple(state for state in machine.STATES if state in reached)


def duration(value: timedelta) -> str:
    """``timedelta(hours=24)`` -> ``24 h``: the largest unit that divides it exactly."""
    seconds = value.total_seconds()
    for unit, size in (("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


def _timer_values(policy: TimerPolicy | None) -> dict[str, str]:
    fields = attrs.fields(TimerPolicy)
    if policy is None:
        return {field.name: field.name for field in fields}
    return {field.name: duration(getattr(policy, field.name)) for field in fields}


def _label(templates: Mapping[str, str], name: str, kind: str, values: Mapping[str, str]) -> str:
    try:
        template = templates[name]
    except KeyError:
        raise LookupError(
            f"the machine's {kind} {name!r} has no label: add it to {kind.upper()}_LABELS"
            " in engine/diagrams.py"
        ) from None
    return template.format_map(values)


def _rules() -> list[machine.Rule]:
    """Every transition of the machine, in declaration order (states, then events)."""
    return list(machine.TABLE.values())


def _edge(rule: machine.Rule, policy: TimerPolicy | None, **more: Any) -> Edge:
    """The rule as an edge, its guard and effect in words, timers named or valued."""
    values = _timer_values(policy)
    guards = [_label(GUARD_LABELS, check.name, "guard", values) for check in rule.guards]
    effects = [_label(EFFECT_LABELS, effect.name, "effect", values) for effect in rule.effects]
    return Edge(rule.source, rule.target, rule.event, guard=" and ".join(guards),
                effect=", ".join(effects), **more)


# --- the three diagrams --------------------------------------------------------------------


def lifecycle() -> Diagram:
    """The canonical lifecycle every provider maps onto."""
    return Diagram(
        name="lifecycle",
        title="txengine payment lifecycle",
        edges=tuple(_edge(rule, None) for rule in _rules()),
    )


@attrs.frozen
class ProviderView:
    """What a diagram needs from a driver: no instance, no credentials."""

    name: str
    capabilities: Any  # engine.drivers.Capabilities
    calls: Mapping[str, str]

    @classmethod
    def of(cls, driver: Any) -> ProviderView:
        """From a driver class or instance (an instance may differ: Forloy offline)."""
        return cls(driver.name, driver.capabilities, dict(driver.calls))


def load_driver_class(name: str) -> type:
    try:
        module_name, _, class_name = DRIVERS[name].partition(":")
    except KeyError:
        raise LookupError(f"no provider named {name!r}; known: {', '.join(DRIVERS)}") from None
    return getattr(importlib.import_module(module_name), class_name)


def _call(view: ProviderView, key: str) -> str:
    try:
        return view.calls[key]
    except KeyError:
        raise LookupError(
            f"the {view.name} driver's `calls` has no entry for {key!r}: add the HTTP call it makes"
        ) from None


def _calls(view: ProviderView, event: str) -> dict[str, Any]:
    capabilities = view.capabilities
    if event in capabilities.remote:
        # "A + B": two calls in one exchange, one line each
        calls = tuple(part.strip() for part in _call(view, event).split(" + "))
    else:
        calls = ("local",)
    deferred = tuple((kind, _call(view, kind)) for kind in capabilities.deferred.get(event, ()))
    return {"calls": calls, "deferred": deferred}


def provider(driver: str | Any) -> Diagram:
    """The transitions ``driver`` supports, with its timers and the calls it makes.

    ``driver`` is a provider name from ``DRIVERS``, a driver class or an instance.
    """
    view = ProviderView.of(load_driver_class(driver) if isinstance(driver, str) else driver)
    capabilities = view.capabilities
    supported = capabilities.supported
    edges = [
        _edge(rule, capabilities.timers, **_calls(view, rule.event))
        for rule in _rules()
        if rule.event in supported
    ]
    notes = []
    for event in machine.EVENTS:
        if event in supported:
            continue
        first_source = next(rule.source for rule in _rules() if rule.event == event)
        notes.append(Note(first_source, (f"{event} is not supported by {view.name}:",
                                         "the engine raises UnsupportedOperation")))
    timers = capabilities.timers
    refunds = (f", refunds within {duration(timers.refund_window)}" if "refund" in supported
               else ", no refunds")
    return Diagram(
        name=view.name,
        title=(f"{view.name}: the lifecycle as its driver runs it"
               f" (preview {duration(timers.preview_ttl)}, update +{duration(timers.update_extension)}"
               f"{refunds})"),
        edges=tuple(edges),
        notes=tuple(notes),
    )


def _clock(at: datetime, day) -> str:
    return at.strftime("%H:%M:%S") if at.date() == day else at.strftime("%Y-%m-%d %H:%M:%S")


def _short(text: Any, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def transaction(tx: Any, events: Sequence[Any], base: Diagram | None = None) -> Diagram:
    """The path ``tx`` took, read from its journal, highlighted on ``base`` (the lifecycle).

    Each transition taken is numbered and timed on its edge, with the deadline it set;
    a provider call that was refused, or whose outcome is unknown, is marked on the edge
    of the event it tried, from the state the transaction was in.
    """
    base = base or lifecycle()
    if not events:
        raise ValueError(f"transaction {tx.id} has an empty journal")
    day = events[0].at.date()
    marks: dict[tuple[str, str], list[Mark]] = {}  # (source, event) -> marks in journal order
    visited: set[str] = set()
    state, steps, attempts = machine.INITIAL, 0, 0
    for seq, entry in enumerate(events):
        data, when = entry.data, _clock(entry.at, day)
        if entry.kind == "transition":
            steps += 1
            text = f"({steps}) {when}" + (f" after {attempts} attempts" if attempts > 1 else "")
            for field in ("expires_at", "refund_deadline"):
                if data["set"].get(field) is not None:
                    text += f", {field} {_clock(decode_time(data['set'][field]), day)}"
            marks.setdefault((data["source"], data["event"]), []).append(Mark(seq, "step", text))
            visited.update((data["source"], data["target"]))
            state, attempts = data["target"], 0
        elif entry.kind == "attempt":
            attempts += 1
        elif entry.kind == "rejected":
            why = f"rejected {data.get('code') or ''}".rstrip()
            if data.get("message"):
                why += f" ({_short(data['message'])})"
            marks.setdefault((state, data["event"]), []).append(Mark(seq, "rejected", f"{when} {why}"))
            attempts = 0
        elif entry.kind == "unknown":
            text = f"{when} outcome unknown ({_short(data.get('error') or 'no answer')})"
            marks.setdefault((state, data["event"]), []).append(Mark(seq, "unknown", text))
    if tx.pending:
        marks.setdefault((tx.state, tx.pending), []).append(
            Mark(len(events), "unknown", "in doubt: recover() or a retry re-sends it"))
    edges = []
    for edge in base.edges:
        found = tuple(marks.pop((edge.source, edge.event), ()))
        style = ("taken" if any(m.kind == "step" for m in found) else "tried") if found else "idle"
        edges.append(Edge(edge.source, edge.target, edge.event, marks=found, style=style))
    notes = list(base.notes)
    for (source, event), found in marks.items():  # a journal the machine no longer explains
        notes.append(Note(source, tuple(f"{event}: {mark.text}" for mark in found), kind="unknown"))
    return Diagram(
        name=tx.id,
        title=f"transaction {tx.id} ({tx.provider}), {day.isoformat()} UTC: {tx.state}",
        edges=tuple(edges),
        notes=tuple(notes),
        visited=frozenset(visited),
        current=tx.state,
        origin=f"Generated by `txengine diagram --tx {tx.id}` from its journal.",
    )


# --- layout, shared by Mermaid and DOT ----------------------------------------------------------

#: Drawn as one composite state: the states whose preview clock runs (``machine.ACTIVE``).
#: An event leaving every one of them alike (same target, same label) is drawn once,
#: from the composite's border, as UML does: fewer edges, no crossings.
OPEN = tuple(state for state in machine.STATES if state in machine.ACTIVE)
OPEN_ID = "open"
OPEN_LABEL = "open: the preview clock runs"


@attrs.frozen
class Drawn:
    """One edge as drawn: as it is, from the composite's border, or through a junction."""

    edge: Edge
    from_open: bool = False
    #: the edges joined at a junction before the labelled edge (UML's merge junction)
    joined: tuple[Edge, ...] = ()

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(member.source for member in self.joined) or (self.edge.source,)

    @property
    def inside(self) -> bool:
        """Drawn within the composite: every end of it is an open state."""
        return not self.from_open and all(state in OPEN for state in (*self.sources, self.edge.target))


def layout(edges: Iterable[Edge]) -> list[Drawn]:
    """Edges of one event and target, alike but for their source, are drawn once.

    From all of ``OPEN``: one edge from the composite.  From some states: they meet at a
    junction, and one labelled edge leaves it.  A self-loop stays apart: through a
    junction it would cross its own label.  A transaction's marks on merged edges are
    kept, in journal order.
    """
    groups: dict[tuple[str, str], list[Edge]] = {}
    for edge in edges:
        groups.setdefault((edge.event, edge.target), []).append(edge)
    drawn = []
    for (_, target), group in groups.items():
        sources = [edge.source for edge in group]
        alike = len({attrs.evolve(edge, source="", marks=(), style="") for edge in group}) == 1
        if len(group) == 1 or not alike or target in sources:
            drawn.extend(Drawn(edge) for edge in group)
            continue
        marks = tuple(sorted((mark for edge in group for mark in edge.marks), key=lambda m: m.seq))
        styles = {edge.style for edge in group}
        style = next((s for s in ("taken", "tried", "idle", "normal") if s in styles))
        one = attrs.evolve(group[0], marks=marks, style=style)
        if sorted(sources) == sorted(OPEN):
            drawn.append(Drawn(attrs.evolve(one, source=OPEN[-1]), from_open=True))
        else:
            drawn.append(Drawn(one, joined=tuple(group)))
    return drawn


# --- Mermaid ----------------------------------------------------------------------------------
# A transition's text runs to the end of its line and may hold neither ":" nor ";"
# (Mermaid's grammar), so a time's colons become the look-alike RATIO sign; "<br>" breaks
# lines.  Mermaid lays out edges into a composite's inner states badly, so the composite is
# entered at its border and its initial pseudo-state leads to the entry state.


def _mermaid_text(text: str) -> str:
    return text.replace(":", "\u2236").replace(";", ",")


def _mermaid_edge(source: str, target: str, edge: Edge | None = None) -> str:
    if edge is None:
        return f"{source} --> {target}"
    return f"{source} --> {target} : {_mermaid_text('<br>'.join(edge.text_lines()))}"


def _mermaid_note(note: Note) -> list[str]:
    return [f"note right of {note.state}", *(f"    {line}" for line in note.lines), "end note"]


def to_mermaid(diagram: Diagram) -> str:
    drawn = layout(diagram.edges)
    entering = {d.edge.target for d in drawn if d.edge.target in OPEN and d.sources[0] not in OPEN}
    entry = entering.pop() if len(entering) == 1 else None
    inner = [f"[*] --> {entry}"] if entry else []
    outer = [f"[*] --> {diagram.initial}"]
    loops = []  # last in their block: Mermaid places a loop's label better then
    for item in drawn:
        edge = item.edge
        block = inner if item.inside else outer
        if item.from_open:
            outer.append(_mermaid_edge(OPEN_ID, edge.target, edge))
        elif item.joined:
            junction = f"{edge.event}_to_{edge.target}"
            block.append(f"state {junction} <<choice>>")
            block.extend(_mermaid_edge(source, junction) for source in item.sources)
            block.append(_mermaid_edge(junction, edge.target, edge))
        elif edge.target == entry and edge.source not in OPEN:
            outer.append(_mermaid_edge(edge.source, OPEN_ID, edge))
        elif edge.source == edge.target:
            loops.append((block, _mermaid_edge(edge.source, edge.target, edge)))
        else:
            block.append(_mermaid_edge(edge.source, edge.target, edge))
    for block, line in loops:
        block.append(line)
    outer.extend(f"{state} --> [*]" for state in diagram.states if state in diagram.terminal)
    for note in diagram.notes:
        # a note inside a composite upsets Mermaid's layout: it goes on the composite
        outer.extend(_mermaid_note(note) if note.state not in OPEN else _mermaid_note(
            Note(OPEN_ID, (f"in {note.state}", *note.lines), note.kind)))

    title = diagram.title.replace('"', "'")
    out = ["---", f'title: "{title}"', "---", "stateDiagram-v2", f"    %% {diagram.origin}"]
    out += [f"    {line}" for line in outer]
    out.append(f'    state "{OPEN_LABEL}" as {OPEN_ID} {{')
    out += [f"        {line}" for line in inner]
    out.append("    }")
    out.append("    classDef terminal fill:#eaeef2,stroke:#57606a")
    terminal = [state for state in diagram.states if state in diagram.terminal]
    if terminal:
        out.append(f"    class {','.join(terminal)} terminal")
    visited = [s for s in diagram.states if s in diagram.visited and s != diagram.current]
    if visited:
        out.append(f"    classDef visited fill:#ddf4ff,stroke:{TAKEN},stroke-width:2px")
        out.append(f"    class {','.join(visited)} visited")
    if diagram.current:
        out.append(f"    classDef current fill:{TAKEN},color:#ffffff,stroke:#0550ae,stroke-width:3px")
        out.append(f"    class {diagram.current} current")
    return "\n".join(out) + "\n"


# --- DOT ----------------------------------------------------------------------------------------
# Every edge label is a node on its edge: dot keeps nodes apart and a cluster's border
# around its nodes, which it does not do for edge labels (they end up across edges and
# borders).  The composite is a cluster; edges leaving it start at its border (ltail).

FONT = "Helvetica,Arial,sans-serif"
MONO = "Courier,monospace"
INK = "#24292f"
MUTED = "#57606a"
IDLE = "#8c959f"
CALL_INK = "#6639ba"
TAKEN = "#0969da"
NOTE_FILL = {"info": "#fff8c5", "unknown": "#fff1e5"}
REFUSED = "#cf222e"
MARK_INK = {"step": TAKEN, "rejected": REFUSED, "unknown": "#9a6700"}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _html(text: str) -> str:
    return html.escape(text, quote=False)


def label_rows(edge: Edge) -> list[tuple[str, str]]:
    """The lines of an edge's DOT label, each with how it is drawn: ``event`` (bold),
    ``text``, ``call`` (monospace) or a mark's kind (coloured)."""
    rows = [("event", edge.event)]
    if edge.guard:
        rows.append(("text", f"[{edge.guard}]"))
    if edge.effect:
        rows.append(("text", f"/ {edge.effect}"))
    rows += [("call", text) for text in edge.calls]
    for kind, text in edge.deferred:
        rows += [("text", f"then deferred {kind}, retried:"), ("call", text)]
    rows += [(mark.kind, mark.text) for mark in edge.marks]
    return rows


def _edge_label(edge: Edge) -> str:
    """An HTML-like label, one table row per line."""
    cells = []
    for kind, text in label_rows(edge):
        if kind == "event":
            text = f"<b>{_html(text)}</b>"
        elif kind == "call":
            text = f'<font face="{MONO}" point-size="9" color="{CALL_INK}">{_html(text)}</font>'
        elif kind in MARK_INK:
            text = f'<font color="{MARK_INK[kind]}">{_html(text)}</font>'
        else:
            text = _html(text)
        cells.append(f"<tr><td>{text}</td></tr>")
    return f'<<table border="0" cellborder="0" cellspacing="0" cellpadding="0">{"".join(cells)}</table>>'


def _style(edge: Edge) -> list[str]:
    if edge.style == "taken":
        return [f'color="{TAKEN}", penwidth=2.5']
    if edge.style == "tried":
        return [f'color="{REFUSED}", style=dashed, penwidth=1.5']
    if edge.style == "idle":
        return ['color="#afb8c1", style=dashed']
    return []


def _node(state: str, diagram: Diagram) -> str:
    attributes = []
    if state in diagram.terminal:
        attributes.append('peripheries=2, fillcolor="#eaeef2"')
    if state == diagram.current:
        attributes.append(f'fillcolor="{TAKEN}", fontcolor="#ffffff", color="#0550ae", penwidth=2.5')
    elif state in diagram.visited:
        attributes.append(f'fillcolor="#ddf4ff", color="{TAKEN}", penwidth=2')
    return _quote(state) + (f" [{', '.join(attributes)}]" if attributes else "") + ";"


def to_dot(diagram: Diagram) -> str:
    out = [
        f"// {diagram.origin}",
        f"digraph {_quote(diagram.name)} {{",
        f'    graph [label={_quote(diagram.title)}, labelloc=t, fontname="{FONT}", fontsize=16,'
        f" rankdir=TB, compound=true, newrank=true, nodesep=0.4, ranksep=0.3, pad=0.3];",
        f'    node [shape=box, style="rounded,filled", fillcolor="#f6f8fa", color="{MUTED}",'
        f' fontcolor="{INK}", fontname="{FONT}", fontsize=13, margin="0.25,0.1"];',
        f'    edge [color="{MUTED}", arrowsize=0.7];',
        '    "__initial__" [shape=circle, style=filled, fillcolor="#24292f", color="#24292f",'
        ' label="", width=0.18, fixedsize=true];',
    ]
    inner = [_node(state, diagram) for state in OPEN if state in diagram.states]
    outer = [_node(state, diagram) for state in diagram.states if state not in OPEN]
    edges = [f'"__initial__" -> {_quote(diagram.initial)};']
    exits = []
    for number, item in enumerate(layout(diagram.edges), 1):
        edge, style = item.edge, _style(item.edge)
        block = inner if item.inside else outer
        tail, lead = _quote(edge.source), ["arrowhead=none"] + style
        if item.from_open:
            lead.append(f'ltail="cluster_{OPEN_ID}"')
            exits.append(edge.target)
        if item.joined:
            tail = _quote(f"__junction{number}__")
            block.append(f'{tail} [shape=point, width=0.1, color="{MUTED}", fillcolor="{MUTED}"];')
            for member in item.joined:
                joining = ", ".join(["arrowhead=none"] + _style(member))
                edges.append(f"{_quote(member.source)} -> {tail} [{joining}];")
        label = _quote(f"__label{number}__")
        ink = {"taken": TAKEN, "tried": REFUSED, "idle": IDLE}.get(edge.style, INK)
        block.append(f'{label} [shape=plaintext, style="", margin="0.08,0.02", fontname="{FONT}",'
                     f' fontsize=10, fontcolor="{ink}", label={_edge_label(edge)}];')
        edges.append(f"{tail} -> {label} [{', '.join(lead)}];")
        edges.append(f"{label} -> {_quote(edge.target)}" + (f" [{', '.join(style)}];" if style else ";"))
    if exits:  # the states the composite leaves for, side by side below it
        side_by_side = " ".join(_quote(state) + ";" for state in dict.fromkeys(exits))
        edges.append(f"{{ rank=same; {side_by_side} }}")
    for number, note in enumerate(diagram.notes, 1):
        node = _quote(f"__note{number}__")
        text = "".join(line.replace("\\", "\\\\").replace('"', '\\"') + "\\l" for line in note.lines)
        outer.append(f'{node} [shape=note, style=filled, fillcolor="{NOTE_FILL[note.kind]}",'
                     f' color="{MUTED}", fontsize=10, label="{text}"];')
        # beside its state, on its rank: a note never pushes the states apart
        edges.append(f"{{ rank=same; {_quote(note.state)}; {node}; }}")
        edges.append(f"{_quote(note.state)} -> {node} [style=dashed, arrowhead=none];")
    out.append(f"    subgraph cluster_{OPEN_ID} {{")
    out.append(f'        graph [label={_quote(OPEN_LABEL)}, labelloc=b, labeljust=l, style="rounded,dashed",'
               f' color="{MUTED}", fontcolor="{MUTED}", fontsize=11];')
    out += [f"        {line}" for line in inner]
    out.append("    }")
    out += [f"    {line}" for line in outer + edges]
    out.append("}")
    return "\n".join(out) + "\n"


# --- rendering with Graphviz --------------------------------------------------------------------


def ensure_dot(*, install: bool = False) -> str:
    """The path of ``dot``; with ``install``, apt-get installs Graphviz when root may.

    Raises ``GraphvizMissing`` with what to do otherwise.  apt's chatter goes to stderr:
    stdout may be carrying a diagram.
    """
    found = shutil.which("dot")
    if found:
        return found
    if install and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        print("Graphviz is missing: installing it with apt-get", file=sys.stderr, flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "graphviz"]):
            subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, env=env, check=False)
        found = shutil.which("dot")
        if found:
            return found
    raise GraphvizMissing(GRAPHVIZ_HELP)


def render(dot_text: str, fmt: str, *, dot: str | None = None) -> bytes:
    """``dot_text`` as ``svg`` or ``png`` bytes, by Graphviz."""
    if fmt not in ("svg", "png"):
        raise ValueError(f"Graphviz renders svg or png here, not {fmt!r}")
    command = [dot or ensure_dot(), f"-T{fmt}"] + (["-Gdpi=144"] if fmt == "png" else [])
    done = subprocess.run(command, input=dot_text.encode(), capture_output=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"dot -T{fmt} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def output(diagram: Diagram, fmt: str, *, dot: str | None = None) -> bytes:
    if fmt == "mermaid":
        return to_mermaid(diagram).encode()
    if fmt == "dot":
        return to_dot(diagram).encode()
    return render(to_dot(diagram), fmt, dot=dot)


# --- the committed files ---------------------------------------------------------------------------


def committed() -> list[Diagram]:
    """The diagrams ``diagrams/`` holds: the lifecycle, then each provider."""
    return [lifecycle()] + [provider(name) for name in DRIVERS]


def text_files() -> dict[str, str]:
    """``{file name: content}`` of the Mermaid and DOT files, for writing and checking."""
    files = {}
    for diagram in committed():
        files[f"{diagram.name}.mmd"] = to_mermaid(diagram)
        files[f"{diagram.name}.dot"] = to_dot(diagram)
    return files


def write(directory: str | Path, *, install_dot: bool = False) -> list[Path]:
    dot = ensure_dot(install=install_dot)  # before writing anything: all or nothing
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for diagram in committed():
        text = to_dot(diagram)
        for suffix, content in ((".mmd", to_mermaid(diagram).encode()), (".dot", text.encode()),
                                (".svg", render(text, "svg", dot=dot))):
            written.append(directory / f"{diagram.name}{suffix}")
            written[-1].write_bytes(content)
    return written


def stale(directory: str | Path) -> list[str]:
    """The Mermaid and DOT files in ``directory`` that differ from what the machine gives."""
    directory = Path(directory)
    return sorted(
        name for name, text in text_files().items()
        if not (directory / name).is_file() or (directory / name).read_text(encoding="utf-8") != text
    )


# The lifecycle's Mermaid, inline in Markdown, between these markers: `make diagrams`
# refreshes it and the tests fail when it is stale, so no copy can drift either.
ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_IN = ("README.md", "docs/diagrams.md")
BEGIN = "<!-- BEGIN lifecycle diagram: generated by `make diagrams` from engine/machine.py -->"
END = "<!-- END lifecycle diagram -->"
_EMBEDDED = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)


def embed(markdown: str) -> str:
    """``markdown`` with the lifecycle's Mermaid block between the markers made current."""
    block = f"{BEGIN}\n```mermaid\n{to_mermaid(lifecycle())}```\n{END}"
    return _EMBEDDED.sub(lambda match: block, markdown)


def stale_markdown(root: str | Path = ROOT) -> list[str]:
    """The Markdown files (of ``EMBEDDED_IN``) whose inline lifecycle diagram is stale."""
    outdated = []
    for name in EMBEDDED_IN:
        path = Path(root) / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            if embed(text) != text:
                outdated.append(name)
    return outdated


def refresh_markdown(root: str | Path = ROOT) -> list[Path]:
    refreshed = []
    for name in stale_markdown(root):
        path = Path(root) / name
        path.write_text(embed(path.read_text(encoding="utf-8")), encoding="utf-8")
        refreshed.append(path)
    return refreshed


# --- the command line ---------------------------------------------------------------------------


def command(args: argparse.Namespace) -> int:
    """``txengine diagram`` (txengine.app.cli declares its options and calls this)."""
    try:
        base = provider(args.provider) if args.provider else None
        if args.tx_id:
            from .store import open_existing

            try:
                store = open_existing(args.db)
            except FileNotFoundError as missing:
                print(missing, file=sys.stderr)
                return 1
            try:
                tx = store.load(args.tx_id)
                if tx is None:
                    print(f"no transaction {args.tx_id} in {args.db}", file=sys.stderr)
                    return 1
                if args.provider and args.provider != tx.provider:
                    print(f"transaction {tx.id} is a {tx.provider} transaction, not {args.provider}",
                          file=sys.stderr)
                    return 1
                diagram = transaction(tx, store.journal(args.tx_id), base)
            finally:
                store.close()
        else:
            diagram = base or lifecycle()
        content = output(diagram, args.format)
    except GraphvizMissing as missing:
        print(missing, file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_bytes(content)
    elif args.format == "png" and sys.stdout.isatty():
        print("a PNG is not for a terminal: add --output FILE", file=sys.stderr)
        return 2
    else:
        sys.stdout.buffer.write(content)
        sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m txengine.diagrams", description="write or check the committed diagrams")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", metavar="DIR", help="write every .mmd, .dot and .svg into DIR")
    action.add_argument("--check", metavar="DIR",
                        help="exit 1 if DIR's .mmd or .dot files, or an inline lifecycle, are stale")
    parser.add_argument("--install-dot", action="store_true",
                        help="apt-get install Graphviz if `dot` is missing and we are root")
    args = parser.parse_args(argv)
    if args.check:
        outdated = [str(Path(args.check) / name) for name in stale(args.check)] + stale_markdown()
        for name in outdated:
            print(f"stale: {name}", file=sys.stderr)
        if outdated:
            print("regenerate with: make diagrams", file=sys.stderr)
        return 1 if outdated else 0
    try:
        written = write(args.write, install_dot=args.install_dot)
    except GraphvizMissing as missing:
        print(missing, file=sys.stderr)
        return 2
    refreshed = refresh_markdown()
    print(f"wrote {len(written)} files into {args.write}"
          + "".join(f"; refreshed the lifecycle in {path.relative_to(ROOT)}" for path in refreshed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
