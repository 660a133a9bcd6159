"""A line that says a live view is over once the kernel that ran it has gone (restarted or shut down).

A restart from JupyterLab drops what the old kernel sends while it stops (the frontend waits for the new kernel's
session), so the final rendering that ``View.end`` sends at the shutdown never arrives: the view stayed as last
drawn, "running 8 · ETA 17 s" with a Stop button whose click reached no kernel. ipywidgets marks every view of
the old kernel's models as disconnected (``comm_live`` false); this widget then says the work ended with its
kernel and disables the view's buttons.
"""

from __future__ import annotations

import anywidget

_ESM = r"""
function render({ model, el }) {
  // after ipywidgets has marked every view of the old kernel's models disconnected (its own box's too; an
  // anywidget's element is not marked)
  const check = () => setTimeout(() => {
    const view = el.closest(".dspex-view");
    if (!view || !view.classList.contains("jupyter-widgets-disconnected")) return;
    el.textContent = "Over: the kernel that ran this view restarted or shut down, and its work ended with it.";
    el.style.cssText = "color:var(--jp-warn-color0,#e65100);font-weight:bold;margin:2px 0";
    view.querySelectorAll("button").forEach((button) => { button.disabled = true; });
  });
  model.on("comm_live_update", check);
  return () => model.off("comm_live_update", check);
}

export default { render };
"""


class KernelGone(anywidget.AnyWidget):
    """Empty while its kernel runs; once the kernel has gone, the line that says the view it is in is over."""

    _esm = _ESM
