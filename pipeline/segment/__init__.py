"""Stage 1: find and mask the tumor (YOLOv8-seg, optionally refined by SAM)."""
