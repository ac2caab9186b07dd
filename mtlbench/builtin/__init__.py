"""mtlbench's own tasks, heads, strategies and dataset sources.

Each module here (segmentation, landmarks, heads, strategies, datasets) is a
plugin named by an entry point in mtlbench's pyproject.toml and registers its
classes through the same hooks a third-party plugin uses; ``phantom/`` is the
generator behind the phantom dataset source. The core never imports these
modules by name.
"""
