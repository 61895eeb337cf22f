"""ihcscore: immunohistochemistry (DAB) cell scoring.

The engine works on plain arrays: a *region* is an RGB ``uint8`` array plus its
pixel size in µm and its origin in level-0 pixels. No Qt or napari imports here.
"""

__version__ = "0.2.1"
