"""Browser front end on trame-slicer: Slicer's own views and MRML scene in a web page.

It adds no segmentation code: CT reading is ``imageio``, inference is ``engine.Segmenter`` (in a worker
thread), and results reach the scene through ``mrml_bridge``. Start it with ``attention-unet-seg serve``.
"""
