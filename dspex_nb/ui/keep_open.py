"""An HTML widget whose rows, opened by a click, stay open when its value is redrawn.

ipywidgets' ``HTML`` replaces its whole DOM on every change, so a ``<details>`` the reader opened (a long result
of the batch view's latest results, a long error) closed again at the next tick. This view notes the
``data-key`` of each open ``<details>`` before a redraw and opens those of the same keys after it.
"""

from __future__ import annotations

import anywidget
import traitlets

_ESM = r"""
function render({ model, el }) {
  const show = () => {
    const open = new Set(Array.from(el.querySelectorAll("details[open][data-key]"), (d) => d.dataset.key));
    el.innerHTML = model.get("value");
    el.querySelectorAll("details[data-key]").forEach((d) => { if (open.has(d.dataset.key)) d.open = true; });
  };
  show();
  model.on("change:value", show);
  return () => model.off("change:value", show);
}

export default { render };
"""


class KeepOpenHTML(anywidget.AnyWidget):
    """HTML (from the views' own escaped markup) whose keyed ``<details>`` keep their open state across values."""

    _esm = _ESM
    value = traitlets.Unicode().tag(sync=True)
