"""What both renderers show, computed once: stream text per field, batch and pool lines."""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dspex_nb import batch, typed
from dspex_nb.pool.calls import Run
from dspex_nb.words import count

__all__ = ["StreamText", "batch_line", "batch_summary", "error_groups", "error_line", "error_lines", "error_text",
           "items_text", "percent", "pool_rows", "printable", "stats_rows", "terminal_batch_line", "text_table"]

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 control characters but tab and newline


def printable(text: str) -> str:
    """``text`` to print as text: its control characters, other than tab and newline, written as escapes (``\\x1b``,
    ``\\r``), so that what an LM answered or a program raised (an ANSI escape sequence, a carriage return) cannot
    move a terminal's cursor to rewrite earlier lines or the summary, set its title or its clipboard, or hide text."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def error_line(record: dict[str, Any]) -> str:
    """The error of a failed item record, as one line of text (``printable``)."""
    return printable(batch.error_line(record))


def error_groups(records: list[dict[str, Any] | None], indices: list[int],
                 groups: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """The failed items ``indices`` grouped by their error (``error_line``), each group in the order given, added to
    ``groups`` where given: ten thousand items that failed alike are one error, not ten thousand lines."""
    groups = {} if groups is None else groups
    for index in indices:
        groups.setdefault(error_line(records[index]), []).append(index)  # type: ignore[arg-type]
    return groups


def items_text(indices: list[int], shown: int = 5) -> str:
    """Which items, the first of them by index: "item 7", "3 items (1, 4, 9)", "10,000 items (1, 3, 5, 7, 9, …)"."""
    if len(indices) == 1:
        return f"item {indices[0]}"
    listed = ", ".join(map(str, heapq.nsmallest(shown, indices))) + (", …" if len(indices) > shown else "")
    return f"{count(len(indices), 'item')} ({listed})"


def error_lines(groups: dict[str, list[int]], limit: int = 20) -> list[str]:
    """One line per error, "which items: the error", the first ``limit`` errors, then how many items failed
    otherwise."""
    listed = list(groups.items())
    lines = [f"{items_text(indices)}: {error}" for error, indices in listed[:limit]]
    rest = sum(len(indices) for _, indices in listed[limit:])
    if rest:
        lines.append(f"… {count(rest, 'more failed item')}, with {count(len(listed) - limit, 'other error')}")
    return lines


@dataclass
class StreamText:
    """The text of each output field of a streaming run, one group per predictor (a multi-step module's
    steps apart, each titled by its predictor's name), read incrementally from the run's chunks."""

    run: Run
    groups: dict[str, dict[str, str]] = field(default_factory=dict)  # predictor -> field -> text
    tokens: int = 0
    status: str = ""
    _read: int = 0
    _ended: set[tuple[str, str]] = field(default_factory=set)  # fields whose stream ended: one that streams again
    # (a predictor called again: a module's own loop, ReAct's steps) shows its new text, not both run together

    def update(self) -> bool:
        """Read the chunks that arrived since the last call; True when anything changed."""
        chunks, self._read = self.run.read(self._read)
        new: dict[tuple[str, str], list[str]] = {}  # each field's tokens of this read, joined once: a long stream
        for chunk in chunks:  # read at once must not cost a copy of the field's text per token
            if chunk.kind == "token":
                where = (predictor_label(chunk.data.get("predictor") or ""), chunk["field"])
                if where in self._ended:
                    self._join(new)
                    self.groups[where[0]][where[1]] = ""
                    self._ended.discard(where)
                new.setdefault(where, []).append(chunk["text"])
                if chunk.data.get("last"):
                    self._ended.add(where)
                self.tokens += bool(chunk["text"])
                continue
            self._join(new)
            if chunk.kind == "status":
                self.status = chunk["message"]
                self._retried(chunk.data.get("retry"))
            elif chunk.kind == "final" and isinstance(chunk.data, dict):
                self._final(shown_fields(chunk.data, None if self.run.decode is None
                                         else lambda _: self.run.decoded()))  # once: see Run.decoded
        self._join(new)
        return bool(chunks)

    def _join(self, new: dict[tuple[str, str], list[str]]) -> None:
        """Add the tokens read to their fields' text (in the order their steps began), and forget them."""
        for (step, name), texts in new.items():
            group = self.groups.setdefault(step, {})
            group[name] = group.get(name, "") + "".join(texts)
        new.clear()

    def _retried(self, predictor: str | None) -> None:
        """Empty the fields ``predictor`` streamed: its call is made again (its reply did not parse), and the next
        attempt's tokens would run on after those of the reply that is not the answer. (DSPy's stream listeners read
        a reply as the adapter in use where the stream is read writes it: the JSONAdapter a ChatAdapter falls back to
        is not, so that attempt streams nothing; the result then fills the fields.)"""
        if predictor is not None and (group := self.groups.get(predictor_label(predictor))):
            group.update(dict.fromkeys(group, ""))

    def _final(self, fields: dict[str, Any]) -> None:
        """The program's output: its fields in the last step's group (streamed ones are the same text), and
        fields that no step streamed (typed ones) there too; an earlier step keeps its own text."""
        last = self.groups.setdefault(next(reversed(self.groups), ""), {})
        streamed = {name for group in self.groups.values() for name in group}
        for name, value in fields.items():
            if name in last or name not in streamed:
                last[name] = field_text(value)

    def lines(self, limit: int | None = None) -> list[str]:
        """The text fallback: ``field: text`` lines, under a ``[step]`` line per step when there are several; each
        field's text cut to its first ``limit`` characters (``excerpt``) where given."""
        if len(self.groups) <= 1:
            return [printable(f"{name}: {excerpt(text, limit)}") for group in self.groups.values()
                    for name, text in group.items()]
        return [printable(line) for step, group in self.groups.items()
                for line in [f"[{step}]", *(f"  {name}: {excerpt(text, limit)}" for name, text in group.items())]]

    def summary(self) -> str:
        run = self.run
        state = {"running": "streaming" if self.tokens else "running", "done": "done", "failed": "failed",
                 "cancelled": "cancelled"}[run.status]
        cache = cache_text(*run.cached)
        # what streamed, if anything: a call without token streaming (--no-stream), a cache hit or a program that
        # calls no LM streams none, and "0 tokens" beside its LM usage would say it used none
        streamed = count(self.tokens, "token") if self.tokens else cache
        line = " · ".join(part for part in (state, f"{run.tool} on {run.worker}", streamed, f"{run.elapsed:.2f} s")
                          if part)
        if self.tokens and run.elapsed > 0:  # tqdm's rate, for the tokens this view shows
            line += f" · {self.tokens / run.elapsed:.1f} tokens/s"
        if any(run.tokens) or run.cost is not None:  # dspy.Parallel's calls have a cost, not tokens
            line += f" · LM {usage_text(*run.tokens, run.cost)}"
        if cache and self.tokens:
            line += f" · {cache}"
        if run.status == "failed":
            line += f" · {error_text(run.error)}"
        elif run.status == "running" and self.status:
            line += f" · {self.status}"
        return printable(line)


def excerpt(text: str, limit: int | None) -> str:
    """``text``, or where it is longer than ``limit`` characters, its start (cut at a space where one is near)
    and how many characters are left out of it here."""
    if limit is None or len(text) <= limit:
        return text
    space = text.rfind(" ", limit * 3 // 4, limit)
    kept = text[:space if space > 0 else limit]
    return f"{kept} … [{len(text) - len(kept):,} more characters: the whole text is in this output's HTML]"


def cache_text(hits: int, calls: int) -> str:
    """How many of a call's LM calls DSPy answered from its cache (which reports no tokens), if any."""
    if not hits:
        return ""
    return "from DSPy's cache" if hits == calls else f"{hits} of {calls} LM calls from DSPy's cache"


def predictor_label(name: str) -> str:
    """A predictor's name as a step title: "topic.predict" (a ChainOfThought's inner Predict) is "topic"."""
    return name.removesuffix(".predict") if name != "predict" else name


def shown_fields(result: dict[str, Any], decode: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """A DSPy tool's result as fields to show: a Prediction's fields, a returned dict's items, or "output".
    ``decode`` (a run's, from ``Pool.run``/``map``) rebuilds it with the program's own classes, as its result; where
    it cannot (a class the kernel lacks), each such value shows as its repr would read, and "NotPortable" says why
    the result will not be that value."""
    if decode is not None:
        try:
            value = decode(result)
        except typed.NotPortable as exc:
            return {**_readable_fields(result), "NotPortable": str(exc)}
        fields = fields_of(value)  # a Prediction, or what the program returned
        return {"output": value} if fields is None else fields
    return _readable_fields(result)


def _readable_fields(result: dict[str, Any]) -> dict[str, Any]:
    if result.get(typed.TAG) != "output":
        return {name: typed.readable(value) for name, value in result.items() if name not in typed.RESERVED}
    value = result["value"]
    value = typed.readable(value["fields"] if isinstance(value, dict) and value.get(typed.TAG) == "prediction"
                           else value)
    return value if isinstance(value, dict) and all(isinstance(k, str) for k in value) else {"output": value}


def fields_of(value: Any) -> dict[str, Any] | None:
    """A value's fields to show: a Prediction's (none, for a signature without output fields, whose repr DSPy cannot
    make) or a non-empty dict's (str keys); None for any other value."""
    items = dict(value.items()) if callable(getattr(value, "items", None)) else None
    if items is None or (not items and not hasattr(value, "_store")):  # an empty dict or DataFrame: as itself
        return None
    return items if all(isinstance(k, str) for k in items) else None


def field_text(value: Any) -> str:
    """A field's value as its line shows it: text as it is, anything else as its repr."""
    return value if isinstance(value, str) else repr(value)


def error_text(error: BaseException | None) -> str:
    if error is None:
        return ""
    message = getattr(error, "message", None) or str(error)
    return f"{getattr(error, 'type', None) or type(error).__name__}: {message}"


def batch_line(snap: dict[str, Any]) -> str:
    """A running batch's status line (the live dashboard's)."""
    return " · ".join(_batch_parts(snap).values())


# The parts of a batch's line a narrow terminal leaves out, the least useful first: what it keeps last is what tqdm
# keeps, n/total (with its percentage), the rate and the ETA, and the failures
LEFT_OUT_FIRST = ("queued", "running", "recovery", "usage", "ok", "elapsed", "rate", "failed", "eta")


def terminal_batch_line(snap: dict[str, Any], columns: int) -> str:
    """``batch_line`` with the percentage done, in fewer than ``columns`` characters, for a terminal: its parts
    ``LEFT_OUT_FIRST`` are left out in that order until it fits (cut short, "…", only where n/total alone does not).
    A line the terminal wraps is not rewritten by ``\r``, which goes back to the start of its last row only, so
    each refresh would leave a row behind; a cut at the end dropped the ETA first."""
    parts = _batch_parts(snap)
    parts["done"] += f" ({percent(snap['ok'] + snap['failed'], snap['total'])})"
    for name in (*LEFT_OUT_FIRST, None):
        line = " · ".join(parts.values())
        if len(line) < columns:
            return line
        parts.pop(name, None)
    return line[:max(columns - 2, 0)] + "…"


def percent(done: int, total: int) -> str:
    """How much of ``total`` is done, in whole percent rounded down (as the dashboard's bar says it): "41%"."""
    return f"{100 * done // max(total, 1)}%"


def _batch_parts(snap: dict[str, Any]) -> dict[str, str]:
    """The parts of a batch's status line by name, in the line's order."""
    parts = {"stopped": snap["status"]} if snap["status"] in ("cancelled", "failed") else {}
    parts.update(done=f"{snap['ok'] + snap['failed']:,}/{snap['total']:,} items", ok=f"ok {snap['ok']:,}",
                 failed=f"failed {snap['failed']:,}", running=f"running {snap['running']:,}",
                 queued=f"queued {snap['queued']:,}", rate=f"{snap['rate']:.1f} items/s",
                 elapsed=seconds(snap["elapsed"]))
    if snap["status"] == "running" and snap["eta"]:
        parts["eta"] = f"ETA {seconds(snap['eta'], 1)}"
    if snap["tokens_in"] or snap["tokens_out"] or snap.get("cost") is not None:
        parts["usage"] = usage_text(snap["tokens_in"], snap["tokens_out"], snap.get("cost"))
    extras = recovery(snap)
    if extras:
        parts["recovery"] = extras
    return parts


def usage_text(tokens_in: int, tokens_out: int, cost: float | None = None) -> str:
    """LM tokens, and their cost where an LM reported one: "1,234 tokens in / 56 out · $0.0012"."""
    text = f"{tokens_in:,} tokens in / {tokens_out:,} out"
    return text if cost is None else f"{text} · {cost_text(cost)}"


def cost_text(cost: float) -> str:
    """US dollars: in cents from a cent up, else to two significant digits ($0.0012, $0.000026)."""
    if cost >= 0.01 or cost <= 0:
        return f"${cost:,.2f}"
    return f"${cost:.{1 - math.floor(math.log10(cost))}f}"


def recovery(snap: dict[str, Any]) -> str:
    """Retries, replaced workers, journal and DSPy cache hits, when there were any."""
    parts = []
    if snap["retries"]:
        parts.append(f"{snap['retries']} retried")
    if snap["replaced"]:
        parts.append(f"{count(snap['replaced'], 'worker')} replaced")
    if snap["from_journal"]:
        parts.append(f"{snap['from_journal']} from the journal")
    if snap.get("from_cache"):  # DSPy reports no tokens for them: nothing was billed
        parts.append(f"{snap['from_cache']} from DSPy's cache")
    return ", ".join(parts)


def batch_summary(snap: dict[str, Any]) -> str:
    """The one deterministic line a finished batch prints outside a live notebook."""
    workers = len(snap["by_worker"])
    where = f" on {count(workers, 'worker')}" if workers else ""
    never = snap["total"] - snap["ok"] - snap["failed"]  # a stopped batch's items that never finished
    line = (f"batch {snap['status']}: {count(snap['total'], 'item')}, {snap['ok']:,} ok, {snap['failed']:,} failed"
            f"{f', {never:,} not run' if never else ''}{where} in {seconds(snap['elapsed'])}")
    if snap["rate"]:  # items computed per second (none when all came from the journal)
        line += f", {snap['rate']:.1f} items/s"
    if snap["tokens_in"] or snap["tokens_out"] or snap.get("cost") is not None:
        line += f", {usage_text(snap['tokens_in'], snap['tokens_out'], snap.get('cost'))}"
    extras = recovery(snap)
    return f"{line} ({extras})" if extras else line


POOL_COLUMNS = ("worker", "pid", "state", "running", "calls done", "failed", "cancelled", "batch items", "restarts",
                "recycles", "memory", "uptime")


def pool_rows(status: list[dict[str, Any]]) -> list[list[str]]:
    """One row per worker of ``pool.status()``: calls (a batch shard is one call) and the batch items they
    returned are counted apart; a call its caller cancelled is not a failure. A worker where a cancelled call's
    program goes on running (see ``Pool(cancel_grace=...)``) says so in its state. The memory of a worker not
    measured yet (just started or replaced: its first health ping is to come, ``rss_mb`` 0) is "-", not 0 MB. Counts
    are written as the tokens are, "2,050" (a long batch's items were "2050" beside "20,010" tokens)."""
    return [[row["worker"], str(row["pid"]), _state(row), *_counts(row["in_flight"], row["done"], row["errors"],
                                                                  row["cancelled"], row["items"], row["restarts"],
                                                                  row["recycles"]),
             f"{row['rss_mb']:.0f} MB" if row["rss_mb"] else "-", duration(row["uptime"]) if row["uptime"] else "-"]
            for row in status]


def pool_notes(status: list[dict[str, Any]]) -> list[str]:
    """Why each worker was last replaced or recycled (or is not recycled for memory), which the table has no room
    for: ``pool.status()``'s ``last_error``, each of which names its worker."""
    return [f"last error: {row['last_error']}" for row in status if row.get("last_error")]


def _counts(*values: int) -> list[str]:
    return [f"{value:,}" for value in values]


def _state(row: dict[str, Any]) -> str:
    going_on = row.get("cancelled_running_s") or 0
    return f"{row['state']} (a cancelled program still running, {duration(going_on)})" if going_on else row["state"]


def seconds(value: float, digits: int = 2) -> str:
    """A batch's elapsed time or ETA: "12.34 s" under a minute, then as ``duration`` ("4 min 05 s", "2 h 03 min"),
    not "7384.12 s"."""
    return f"{value:.{digits}f} s" if value < 60 else duration(value)


def duration(seconds: float) -> str:
    """A human duration: "850 ms", "12.3 s", "4 min 05 s", "2 h 03 min"."""
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.1f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


STATS_COLUMNS = ("tool", "calls", "failed", "chunks", "tokens in", "tokens out", "cost", "queue wait p50",
                 "time p50", "time p95", "first chunk p50")


def stats_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per tool of ``pool.stats()``: counts and timings in milliseconds."""
    def ms(timing: dict[str, float], key: str) -> str:
        return duration(timing[key] / 1e3) if timing else "-"

    return [[tool, *_counts(t["calls"], t["errors"], t["chunks"], t["tokens_in"], t["tokens_out"]),
             "-" if t["cost"] is None else cost_text(t["cost"]),
             ms(t["queue_wait"], "p50_ms"),
             ms(t["execution"], "p50_ms"), ms(t["execution"], "p95_ms"), ms(t["first_chunk"], "p50_ms")]
            for tool, t in summary["tools"].items()]


def text_table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
