"""Data structures shared by the data pipeline (which makes them) and the models (which
consume them): instance masks kept as polygons (:class:`PolygonMasks`)."""

from maedet.structures.masks import PolygonMasks, polygons_to_bitmask, rasterize_polygons_within_box

__all__ = ["PolygonMasks", "polygons_to_bitmask", "rasterize_polygons_within_box"]
