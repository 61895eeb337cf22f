"""napari plugin for ihcscore: reader, dock widget and writers. Calls the engine only."""
