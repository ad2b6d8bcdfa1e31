"""``trainfer demo``: the main job on embedded digits (data, training, pipeline, report).

The application built on the library, not part of it: nothing below ``trainfer.demo`` imports it.
"""
