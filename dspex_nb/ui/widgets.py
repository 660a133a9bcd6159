"""Live views: a token stream view and a batch dashboard (ipywidgets), a pool dashboard (HTML updated in place).

Views know nothing of gRPC: they read a ``Run``, a ``BatchRun`` or a ``Pool``. ``refresh()`` is
called by the pump (at most ~10 times a second) and sends only the values that changed, in one
``hold_sync`` message per widget; a field's token text travels as deltas (``append.AppendText``).
"""

from __future__ import annotations

import contextlib
import html
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import ipywidgets as w
from markdown_it import MarkdownIt

from dspex_nb.batch import BatchRun
from dspex_nb.pool.calls import Run
from dspex_nb.pool.executor import Executor
from dspex_nb.ui import progress
from dspex_nb.ui.append import AppendText
from dspex_nb.ui.keep_open import KeepOpenHTML
from dspex_nb.ui.kernel_gone import KernelGone
from dspex_nb.words import count

LATEST_ROWS = 8
# The characters of an item's output that its row of the latest results holds, one click away: a whole output there
# (a list of 2,000 records) made the table 1.7 MB, sent to the browser at each tick while items arrived
ROW_TEXT = 2000


def _set(widget: w.Widget, **values: Any) -> None:
    """Assign only the traits that changed, so an unchanged view sends nothing."""
    changed = {k: v for k, v in values.items() if getattr(widget, k) != v}
    if changed:
        with widget.hold_sync():
            for key, value in changed.items():
                setattr(widget, key, value)


CELL = "text-align:left;padding-right:1em"


def _table(columns: tuple[str, ...] | list[str], rows: list[list[str]], title: str = "") -> str:
    """A titled HTML table that scrolls sideways in a narrow window rather than clipping its columns. A long cell's
    key is its row's first value (an item's index, a worker) and its column, so the cell opened stays open as the
    rows move down (``KeepOpenHTML``). Every cell is aligned left, as its header and the text twin's columns are
    (JupyterLab aligns a rendered table's cells right: a worker's "w0" and each figure stood apart from its header)."""
    caption = f"<caption style='text-align:left;font-weight:bold'>{html.escape(title)}</caption>" if title else ""
    head = "".join(f"<th style='{CELL}'>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td style='{CELL}'>{_cell(v, key=f'{row[0]}/{i}')}</td>"
                                    for i, v in enumerate(row)) + "</tr>"
                   for row in rows)
    return (f"<div style='overflow-x:auto'><table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            "</table></div>")


def _cell(text: str, width: int = 90, key: str = "") -> str:
    """A table cell: short text as it is; longer text shortened, the whole of it one click away."""
    if len(text) <= width:
        return html.escape(text)
    keyed = f" data-key='{html.escape(key)}'" if key else ""
    return (f"<details{keyed}><summary>{html.escape(text[:width - 1])}…</summary>"
            f"<div style='{PROSE}'>{html.escape(text)}</div></details>")


def stop_button(cancel: Callable[[], Any]) -> w.Button:
    """A Stop button that calls ``cancel`` (a handle's bound method), and works while the cell that made it still
    blocks the kernel.

    A click is a comm message on the shell channel, which the kernel's main thread only reads once the
    running cell has finished. ipykernel 7 reads every shell message first in its shell-channel thread
    and asks the comm there where to route it (``_reply_subshell_for``, for subshells): this view answers
    a click at that moment, in that thread, so the remote work stops within a round trip. Where the hook
    is missing, the click acts when the kernel reads it, as before.

    The button holds its handle weakly: an ipywidgets widget is in a reference cycle of its own (its message
    callbacks hold its methods), so a click handler holding the handle kept the run and its result in the kernel
    after its view had ended and the cell's value was gone, until Python's cycle collector ran.
    """
    stop = weakref.WeakMethod(cancel)  # type: ignore[arg-type]

    def action() -> None:
        bound = stop()
        if bound is not None:
            bound()

    button = w.Button(description="Stop", icon="stop", button_style="warning",  # not shrunk to "S…" in a narrow
                      layout={"width": "7em", "flex": "0 0 auto"})  # window by the status line beside it
    button.on_click(lambda _: action())
    comm = getattr(button, "comm", None)
    route = getattr(comm, "_reply_subshell_for", None)
    if route is not None:
        def early(data: Any, default: Any) -> Any:
            content = data.get("content") if isinstance(data, dict) else None
            if isinstance(content, dict) and data.get("method") == "custom" and content.get("event") == "click":
                with contextlib.suppress(Exception):  # never lose the message itself
                    action()  # cancelling is idempotent: the later on_click does nothing more
            return route(data, default)

        comm._reply_subshell_for = early  # type: ignore[union-attr]
    return button


def live_root(rows: list[w.Widget]) -> w.VBox:
    """A live view's box: its rows under a line that says the view is over once its kernel has gone."""
    root = w.VBox([rows[0], KernelGone(), *rows[1:]])
    root.add_class("dspex-view")  # where that line finds the buttons it disables
    return root


class _Static:
    """A finished view's rendering: HTML with a text/plain twin, which a saved notebook keeps."""

    def __init__(self, bundle: dict[str, str]) -> None:
        self.bundle = bundle

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, str]:
        return self.bundle


class View:
    """A widget tree with a stable text/plain repr (what nbval and terminals see).

    Live widgets only while live: when the view is final, ``finish()`` replaces its output (by display
    id) with ``static()``, so a saved notebook, one reopened without a kernel, nbconvert's HTML and
    GitHub's viewer all show the result rather than "model not found".
    """

    root: w.Widget
    plain: str
    work: Run | BatchRun  # what it shows
    handle: Any = None  # the DisplayHandle it was shown with
    _finished = False

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The widgets, and for a reader that cannot show them (nbconvert, GitHub, VS Code without the kernel) what
        they are: a notebook saved while the view runs keeps this bundle. JupyterLab shows the widget's mime type
        whenever it is there, and "model not found" without its model (ipywidgets' renderer has no fallback)."""
        bundle = self.root._repr_mimebundle_(**kwargs)
        note = f"{self.plain} ({UNFINISHED})"
        bundle.update({"text/plain": note,
                       "text/html": f"<div class='dspex-live' style='{MUTED}'>{html.escape(note)}</div>"})
        return bundle

    def refresh(self) -> bool:
        """Bring the widgets up to date; False once the view is final (the pump then drops it)."""
        raise NotImplementedError

    def static(self) -> dict[str, str]:
        """The final rendering: {"text/html": ..., "text/plain": ...}."""
        raise NotImplementedError

    def end(self, deadline: float) -> None:
        """Make it final now, its work (asked to stop) ended or not by ``deadline`` (the kernel shuts down)."""
        self.work.wait(max(0.0, deadline - time.monotonic()))
        self.refresh()
        self.finish()

    def finish(self) -> None:
        """Replace the live widgets with the static rendering (once)."""
        if self._finished or self.handle is None:
            return
        self.handle.update(_Static(self.static()))
        self._finished = True  # only now: a Ctrl-C that stopped the update leaves it to the pump's next tick
        _close(self.root)


def _close(root: w.Widget) -> None:
    """Close ``root`` and every widget it holds (children, layouts, styles): each open one stays in the kernel and
    in the browser for as long as they run. Their text is emptied first, as a notebook executed by nbconvert or
    papermill saves the last state of every model it saw, closed or not: it would keep a streamed answer twice."""
    for widget in _tree(root):
        if isinstance(getattr(widget, "value", None), str) and widget.value:
            widget.value = ""
        widget.close()


def _tree(widget: w.Widget) -> Iterator[w.Widget]:
    """``widget`` and the widgets its synced traits hold, at any depth."""
    yield widget
    for name in widget.keys:
        value = getattr(widget, name)
        for child in value if isinstance(value, tuple | list) else (value,):
            if isinstance(child, w.Widget):
                yield from _tree(child)


class StreamView(View):
    """Live text per output field, one group per predictor (a multi-step module's steps apart, titled by
    the step), a status line and a Stop button."""

    def __init__(self, run: Run, title: str) -> None:
        self.text = progress.StreamText(run)
        self.work = run
        self.plain = f"<dspex stream: {title}>"
        self.title = w.HTML(f"<b>{html.escape(title)}</b>")
        self.fields = w.VBox()
        self.status = w.HTML()
        self.stop = stop_button(run.cancel)
        self.step_views: dict[str, tuple[w.HTML, w.VBox]] = {}  # step -> (its title, its fields)
        self.field_views: dict[tuple[str, str], AppendText] = {}
        self.root = live_root([self.title, w.HBox([self.stop, self.status]), self.fields])

    def refresh(self) -> bool:
        run = self.text.run
        done = run.done  # read before the chunks, so the last chunks are always shown
        self.text.update()
        several = len(self.text.groups) > 1
        for step, group in self.text.groups.items():
            if step not in self.step_views:
                self.step_views[step] = (w.HTML(), w.VBox())
                self.fields.children = (*self.fields.children, w.VBox(list(self.step_views[step])))
            heading, box = self.step_views[step]
            _set(heading, value=_step_html(step) if several else "")
            for name, value in group.items():
                view = self.field_views.get((step, name))
                if view is None:
                    view = self.field_views[(step, name)] = AppendText(name, PROSE)
                    box.children = (*box.children, view)
                view.show(value)  # only the new end of the text travels
        _set(self.status, value=html.escape(self.text.summary()))
        if done:
            _set(self.stop, disabled=True)
        return not done

    def static(self) -> dict[str, str]:
        several = len(self.text.groups) > 1
        steps = "".join((_step_html(step) if several else "")
                        + "".join(_field_html(name, value) for name, value in group.items())
                        for step, group in self.text.groups.items())
        summary = self.text.summary()
        return {"text/html": f"<div class='dspex-run'>{self.title.value}{steps}<div style='{MUTED}'>"
                             f"{html.escape(summary)}</div></div>",
                "text/plain": "\n".join([*self.text.lines(TWIN_LIMIT), summary])}


def _step_html(step: str) -> str:
    """A step's title (a multi-step module's predictor), set apart from the field names under it."""
    return f"<div class='dspex-step' style='{STEP}'>step <b>{html.escape(step)}</b></div>"


def _field_html(name: str, value: str) -> str:
    """A finished field: its text as markdown (prose wraps, code stays monospace; raw HTML in the text is
    shown as text, never run; an image is shown as its link, never fetched), in a box of bounded height."""
    return f"<div><b>{html.escape(name)}</b><div class='dspex-prose' style='{BOX}'>{MARKDOWN.render(value)}</div></div>"


# What a live view's output says where its widgets cannot show: its result replaces the output when it ends, so only a
# notebook saved (or run by nbconvert) before then keeps this
UNFINISHED = ("a live view, shown with Jupyter widgets by the kernel that runs it; its result replaces it when it "
              "ends: a notebook saved before then keeps no result")
# The characters of each field that a finished view's text/plain twin keeps. A saved notebook needs both forms:
# JupyterLab (after a restart too), GitHub and nbviewer show the HTML (the answer's markdown rendered, safely) and never
# the twin; a terminal, nbconvert's LaTeX/PDF and review tools read only the twin; and text/markdown, the one form both
# could read, is rendered with its raw HTML and images by some viewers. Past this length the HTML alone holds the
# answer, and the twin its start and where the rest is: a 50,000-token answer was saved twice (664 KB; 349 KB now).
TWIN_LIMIT = 2000
BOX = "overflow-wrap:anywhere;max-height:24em;overflow-y:auto"
STEP = "margin-top:0.6em;border-bottom:1px solid rgba(128,128,128,0.4);opacity:0.85"
PROSE = f"white-space:pre-wrap;word-break:normal;{BOX}"  # live text, as it streams
# No raw HTML, and no images: an image in an LM's answer would be fetched by every browser that shows the output,
# the notebook's readers' too, with whatever its URL carries (a prompt injection's way to send data out).
MARKDOWN = MarkdownIt("commonmark", {"html": False}).disable("image")
MUTED = "opacity:0.75;font-size:0.9em"


class BatchDashboard(View):
    """Progress bar, counts, items/s, ETA, per-worker activity, latest results and errors, Stop."""

    work: BatchRun

    def __init__(self, batch: BatchRun, title: str) -> None:
        self.work = batch
        self.plain = f"<dspex batch: {title}, {count(batch.total, 'item')}>"
        self.bar = w.IntProgress(value=0, min=0, max=max(batch.total, 1), bar_style="info", description="0%",
                                 style={"description_width": "3.5em"}, layout={"width": "60%"})
        self.counts = w.HTML()
        self.workers = w.HTML()
        self.latest = KeepOpenHTML()  # a row opened by a click stays open as the rows are redrawn
        self.errors = KeepOpenHTML(layout={"max_height": "16em", "overflow": "auto"})  # one row per error
        self.error_groups: dict[str, list[int]] = {}  # error -> the items that failed with it, as they came
        self._failures_read = 0
        self._rows: dict[int, list[str]] = {}  # the latest results' rows, by item
        self.error_box = w.Accordion(children=[self.errors], titles=("errors (0)",), layout={"display": "none"})
        self.stop = stop_button(batch.cancel)
        self.title = f"<b>{html.escape(title)}</b>"
        self.root = live_root([w.HTML(self.title), w.HBox([self.bar, self.stop]), self.counts, self.workers,
                               self.latest, self.error_box])

    def refresh(self) -> bool:
        batch = self.work
        done = batch.done  # read before the snapshot, so the last refresh always shows the final counts
        snap = batch.snapshot()
        style = _bar_style(snap)
        finished = snap["ok"] + snap["failed"]
        _set(self.bar, value=finished, bar_style=style, description=progress.percent(finished, snap["total"]))
        warning = f"<br><b>warning:</b> {html.escape(snap['warning'])}" if snap["warning"] else ""
        _set(self.counts, value=html.escape(progress.batch_line(snap)) + warning)
        workers = sorted(set(snap["by_worker"]) | set(snap["active"]))
        _set(self.workers, value=_table(["worker", "items running", "items done"], [
            [wid, str(snap["active"].get(wid, 0)), str(snap["by_worker"].get(wid, 0))] for wid in workers],
            "per worker"))
        _set(self.latest, value=_table(["item", "worker", "result"], self._latest_rows(), "latest results"))
        new = batch.failures[self._failures_read:]
        if new:
            self._failures_read += len(new)
            progress.error_groups(batch.records, new, self.error_groups)
            rows = [[error, progress.items_text(indices)] for error, indices in list(self.error_groups.items())[:200]]
            _set(self.errors, value=_table(["error", "items"], rows))
            self.error_box.set_title(0, _errors_title(self.error_groups))
            _set(self.error_box.layout, display="")  # no "errors (0)"
        if done:
            _set(self.stop, disabled=True)
        return not done

    def _latest_rows(self) -> list[list[str]]:
        """The rows of the items that arrived last, newest first. Each item's row is made once, as it arrives among
        them: its output is decoded as the program's value for it once, not at every tick while it is shown (an
        item of 800 KB took the pump 12 ms a tick, eight rows 95 ms of every 100)."""
        batch = self.work
        self._rows = {index: self._rows.get(index) or _latest_row(batch.records[index], batch.decode)  # type: ignore
                      for index in reversed(batch.arrived[-LATEST_ROWS:])}
        return list(self._rows.values())

    def static(self) -> dict[str, str]:
        snap = self.work.snapshot()
        summary = progress.batch_summary(snap)
        total = max(snap["total"], 1)
        cancelled = snap["total"] - snap["ok"] - snap["failed"]
        bar = "".join(f"<div class='dspex-bar-{kind}' title='{n} {kind}' style='width:{100 * n / total:.2f}%;"
                      f"background:{color};height:100%'></div>"
                      for kind, n, color in (("ok", snap["ok"], "#2e7d32"), ("failed", snap["failed"], "#c62828"),
                                             ("cancelled", cancelled, "#9e9e9e")) if n)
        groups = progress.error_groups(self.work.records, sorted(self.work.failures))
        errors = "".join(f"<li>{_cell(line, 300)}</li>" for line in progress.error_lines(groups, 50))
        details = (f"<details><summary>{_errors_title(groups)}</summary><ul style='max-height:16em;overflow-y:auto'>"
                   f"{errors}</ul></details>" if groups else "")
        warning = f"<div>warning: {html.escape(snap['warning'])}</div>" if snap["warning"] else ""
        plain = "\n".join([summary, *(f"  {line}" for line in progress.error_lines(groups))])
        return {"text/html": f"<div class='dspex-batch'>{self.title}<div style='display:flex;height:6px;width:60%;"
                             f"background:#eee'>{bar}</div><div class='dspex-summary'>{html.escape(summary)}</div>"
                             f"{warning}{details}</div>",
                "text/plain": plain}


def _errors_title(groups: dict[str, list[int]]) -> str:
    """"errors (3)", or, where items failed alike, "errors (10,000 items, 2 errors)"."""
    failed = sum(len(indices) for indices in groups.values())
    if failed == len(groups):
        return f"errors ({failed:,})"
    return f"errors ({count(failed, 'item')}, {count(len(groups), 'error')})"


def _bar_style(snap: dict[str, Any]) -> str:
    """The live bar's colour: a few failures are a warning, not the whole bar in red; cancelled is grey."""
    if snap["status"] in ("cancelled", "failed") and snap["ok"] + snap["failed"] < snap["total"]:
        return ""
    if snap["failed"]:
        return "danger" if snap["failed"] == snap["ok"] + snap["failed"] else "warning"
    return "success" if snap["status"] == "done" else "info"


def _latest_row(record: dict[str, Any], decode: Callable[[Any], Any] | None) -> list[str]:
    """An item's row of the latest results: its index, worker, and its output (or error), cut to ``ROW_TEXT``
    characters."""
    if record["ok"]:
        text = "; ".join(f"{k}: {v}" for k, v in progress.shown_fields(record["result"], decode).items())
    else:
        text = "✗ " + progress.error_line(record)
    if len(text) > ROW_TEXT:
        text = f"{text[:ROW_TEXT]} … [{len(text) - ROW_TEXT:,} more characters in the item's result]"
    return [str(record["index"]), str(record.get("worker", "")), text]


class PoolDashboard:
    """Each worker's pid, state, calls and batch items, restarts, memory, uptime, and the calls by tool.

    Not a widget (it has nothing to click): while the pool runs, its display is replaced, at most once every
    ``interval`` seconds and only when it changed, by HTML with a text/plain twin, so a notebook saved at any
    moment holds the status as last shown, as a widget's output would not. When the pool stops, the last
    table seen stays, saying so."""

    interval = 1.0

    def __init__(self, pool: Executor) -> None:
        self.pool = pool
        self.handle: Any = None  # the DisplayHandle it was shown with
        self.last_rows: list[list[str]] = []  # the workers as last seen running
        self.last_notes: list[str] = []  # and their last errors
        self.shown: dict[str, str] = {}
        self._shown_at = 0.0

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, str]:
        self.shown, self._shown_at = self.rendering(), time.monotonic()
        return self.shown

    def refresh(self) -> bool:
        running = self.pool.running
        if running and time.monotonic() - self._shown_at < self.interval:
            return True
        bundle = self.rendering()
        if bundle != self.shown and self.handle is not None:
            self.handle.update(_Static(bundle))
        self.shown, self._shown_at = bundle, time.monotonic()
        return running

    def rendering(self) -> dict[str, str]:
        """The dashboard now: {"text/html": ..., "text/plain": ...}."""
        running = self.pool.running
        if running:
            status = self.pool.status()
            self.last_rows, self.last_notes = progress.pool_rows(status), progress.pool_notes(status)
        state = "running" if running else "stopped"
        header = f"pool · {count(self.pool.size, 'worker')} · lm={self.pool.lm} · {state}"
        parts, plain = [f"<b>pool</b>{html.escape(header[4:])}"], [header]
        if self.last_rows:
            caption = "workers" if running else "workers, as last seen before the pool stopped"
            parts.append(_table(progress.POOL_COLUMNS, self.last_rows, caption))
            plain.append(progress.text_table(progress.POOL_COLUMNS, self.last_rows))
            parts.extend(f"<div>{html.escape(note)}</div>" for note in self.last_notes)
            plain.extend(self.last_notes)
        rows = progress.stats_rows(self.pool.stats())
        if rows:
            parts.append(_table(progress.STATS_COLUMNS, rows, "calls by tool"))
            plain.append(progress.text_table(progress.STATS_COLUMNS, rows))
        return {"text/html": f"<div class='dspex-pool'>{''.join(parts)}</div>", "text/plain": "\n".join(plain)}
