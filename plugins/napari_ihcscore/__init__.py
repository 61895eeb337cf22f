"""napari plugin for ihcscore: reader, dock widget, writers and sample data.

The plugin only calls the engine (:mod:`ihcscore`); it holds no detection or
scoring logic. napari knows it by its distribution name, ``ihcscore``
(``viewer.open(path, plugin="ihcscore")``, ``napari -w ihcscore "IHC score"``).
"""

__all__ = ["napari_get_reader", "IHCScoreWidget"]


def __getattr__(name):  # lazy: importing the package must not import Qt
    if name == "napari_get_reader":
        from ._reader import napari_get_reader

        return napari_get_reader
    if name == "IHCScoreWidget":
        from ._widget import IHCScoreWidget

        return IHCScoreWidget
    raise AttributeError(name)
