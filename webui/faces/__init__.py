"""Face restoration: GFPGAN and CodeFormer (through spandrel) on faces found by a detector that
needs no download (OpenCV's Haar cascade). See `restore` for how a face is cropped, restored and
blended back."""

from webui.faces.detect import Box, FaceDetector, HaarFaces
from webui.faces.restore import RESTORERS, FaceRestorers, Restorer

__all__ = ["RESTORERS", "Box", "FaceDetector", "FaceRestorers", "HaarFaces", "Restorer"]
