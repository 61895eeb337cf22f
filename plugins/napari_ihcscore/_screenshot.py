"""Documentation screenshots: ``python -m napari_ihcscore._screenshot docs/img/napari_widget.png [SLIDE]``.

Writes the whole window to ``OUT`` and the dock scrolled to its results
(table, histogram) to ``OUT`` with ``_widget`` replaced by ``_results``.

Opens a sample slide (default: OS-2-ndpi from ``sample_slides/``, else the
scikit-image sample), docks the "IHC score" widget, scores a rectangle and
grabs the whole window. Needs a display (``xvfb-run -a``).
"""

from __future__ import annotations

import sys
import time


def main(out: str, slide: str | None = None) -> None:
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_ihcscore._sample_data import _skimage_in_memory, find_sample
    from napari_ihcscore._widget import IHCScoreWidget

    import warnings

    warnings.filterwarnings("ignore", message=".*PyQt5.*")
    try:  # the PyQt5 deprecation toast would cover the canvas
        import napari._qt.qt_main_window as qmw

        qmw.SHOW_QT_WARNING = False
    except (ImportError, AttributeError):
        pass
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1760, 1240)
    path = slide or find_sample("OS-2-ndpi")
    if path is not None:
        layer = viewer.open(str(path), plugin="ihcscore")[0]
    else:
        data, kw, _ = _skimage_in_memory()[0]
        layer = viewer.add_image(data, **kw)
    w = IHCScoreWidget(viewer)
    dock = viewer.window.add_dock_widget(w, name="IHC score", area="right")
    from qtpy.QtCore import Qt

    viewer.window._qt_window.resizeDocks([dock], [560], Qt.Horizontal)
    if "ki67" in [w.preset_combo.itemText(i) for i in range(w.preset_combo.count())]:
        w.preset_combo.setCurrentText("ki67")
    # a rectangle of ~40 % of the slide, centred
    h, wd = (layer.data[0] if layer.multiscale else layer.data).shape[:2]
    sy, sx = layer.scale[-2:]
    y0, y1, x0, x1 = 0.3 * h * sy, 0.7 * h * sy, 0.3 * wd * sx, 0.7 * wd * sx
    viewer.add_shapes([np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]])], shape_type="rectangle",
                      name="annotations", edge_color="lime", face_color=[0, 0, 0, 0], edge_width=2 * sx)
    w.run(sync=True)
    if w.last_error:
        raise SystemExit(w.last_error)
    w.detection_section.toggle.setChecked(False)
    viewer.reset_view()
    from napari_ihcscore._widget import _camera_and_canvas

    cam, _ = _camera_and_canvas(viewer)
    cam.zoom *= 1.5
    cam.center = ((y0 + y1) / 2, (x0 + x1) / 2)
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    from napari.utils.notifications import notification_manager

    notification_manager.records.clear()
    img = viewer.screenshot(canvas_only=False, flash=False)
    from PIL import Image

    # RGB with an adaptive 256-colour palette: a fraction of the size, no visible loss at this scale
    Image.fromarray(img[..., :3]).quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out, optimize=True)
    # the results half of the dock (table and histogram), scrolled into view
    from qtpy.QtWidgets import QScrollArea

    scroll = w.findChild(QScrollArea)
    scroll.verticalScrollBar().setValue(scroll.verticalScrollBar().maximum())
    for _ in range(10):
        QApplication.processEvents()
        time.sleep(0.05)
    results = out.replace(".png", "_results.png") if out.endswith("_widget.png") is False else \
        out.replace("_widget.png", "_results.png")
    w.grab().save(results)
    print(f"wrote {results}")
    print(f"wrote {out} {img.shape}; {len(w.result.cells)} cells; tumour H-score "
          f"{w.summaries['all regions']['tumour']['h_score']}")
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
