"""A text widget that grows by deltas: each tick sends only the new text, so a long stream costs
bytes linear in its length (an HTML widget whose whole value is resent each tick costs O(n²)).

The new text travels as numbered custom messages. The browser keeps the text per model (``initialize``)
and each view appends a text node (``render``), so a tick costs the browser the new characters, not a
re-layout of the whole answer. The synced ``value``/``seq`` pair is a checkpoint: it is what a view
created later starts from, and it is refreshed whenever the text has doubled since the last one (at
most twice the text's size in all), which also repairs a view that missed messages (a gap in ``seq``).
"""

from __future__ import annotations

import uuid

import anywidget
import traitlets

_ESM = r"""
const texts = new Map();  // key -> {text, next, views}: one per model, shared by its views

function state(model) {
  const key = model.get("key");
  if (!texts.has(key)) texts.set(key, {text: model.get("value"), next: model.get("seq"), views: new Set()});
  return texts.get(key);
}

function initialize({ model }) {
  const s = state(model);
  const checkpoint = () => {
    if (model.get("seq") < s.next) return;  // older than what the messages brought
    s.text = model.get("value"); s.next = model.get("seq");
    s.views.forEach((view) => view(null));
  };
  const append = (msg) => {
    if (msg.seq !== s.next) return;  // already in a checkpoint, or after a gap the next checkpoint repairs
    s.text += msg.text; s.next += 1;
    s.views.forEach((view) => view(msg.text));
  };
  model.on("change:seq", checkpoint);
  model.on("msg:custom", append);
  return () => {
    model.off("change:seq", checkpoint); model.off("msg:custom", append); texts.delete(model.get("key"));
  };
}

function render({ model, el }) {
  const s = state(model);
  el.classList.add("dspex-field");
  const label = document.createElement("b");
  const body = document.createElement("div");
  body.className = "dspex-field-text";
  body.style.cssText = model.get("style");
  const show = (delta) => {
    const atEnd = body.scrollHeight - body.scrollTop - body.clientHeight < 8;
    if (delta === null) body.textContent = s.text; else body.append(delta);
    if (atEnd) body.scrollTop = body.scrollHeight;
  };
  const relabel = () => { label.textContent = model.get("label"); };
  relabel(); show(null);
  model.on("change:label", relabel);
  s.views.add(show);
  el.append(label, body);
  return () => { s.views.delete(show); model.off("change:label", relabel); };
}

export default { initialize, render };
"""


class AppendText(anywidget.AnyWidget):
    """One labelled text field; ``extend(text)`` shows the new text at the end of it."""

    _esm = _ESM
    key = traitlets.Unicode().tag(sync=True)  # this model's text in the browser's per-model map
    label = traitlets.Unicode().tag(sync=True)
    style = traitlets.Unicode().tag(sync=True)
    value = traitlets.Unicode().tag(sync=True)  # the checkpoint: the text as of message ``seq``
    seq = traitlets.Int(0).tag(sync=True)

    def __init__(self, label: str, style: str) -> None:
        super().__init__(key=uuid.uuid4().hex, label=label, style=style)  # the key is in the model from the start
        self.text = ""  # everything so far
        self._sent = 0  # messages sent

    def replace(self, text: str) -> None:
        """Show ``text`` as the whole value (when it is not an extension of what was shown)."""
        self.text = text
        self._sent += 1  # a checkpoint counts as a message, so every view takes it
        self._checkpoint()

    def extend(self, delta: str) -> None:
        if not delta:
            return
        self.text += delta
        if len(self.text) >= 2 * len(self.value) + 256:
            self._sent += 1  # the checkpoint carries this delta: no message for it
            self._checkpoint()
        else:
            self.send({"seq": self._sent, "text": delta})
            self._sent += 1

    def _checkpoint(self) -> None:
        with self.hold_sync():
            self.value = self.text
            self.seq = self._sent

    def show(self, text: str) -> None:
        """Bring the field to ``text``: the new end alone where it extends what was shown."""
        if text.startswith(self.text):
            self.extend(text[len(self.text):])
        else:
            self.replace(text)
