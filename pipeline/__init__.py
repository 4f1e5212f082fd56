"""Two-stage brain MRI pipeline: segment the tumor, then classify the region.

Data flows one way: datasets -> segment -> roi -> classify -> evaluate -> report.
"""

__version__ = "0.1.0"

#: The four canonical classes, in the order every model output uses.
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
TUMOR_CLASSES = ("glioma", "meningioma", "pituitary")
