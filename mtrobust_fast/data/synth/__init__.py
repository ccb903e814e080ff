"""The synthetic data generators, kept apart from the dataset readers: a small ray-traced room renderer
(``scene``, ``rooms``) and the two datasets written with it, Taskonomy scenes (``taskonomy``: every task's label from
the scene geometry) and the object-classification set (``objects``)."""
