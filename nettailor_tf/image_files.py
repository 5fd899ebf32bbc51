"""Reading the image files a user points the predict command at (PIL only, no
TensorFlow: the command checks every image before it loads a model)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from nettailor_tf.common.errors import PredictError, first_line


def check_image(path: str) -> None:
    """Fails with a PredictError unless PIL can read the file's header."""
    if not os.path.isfile(path):
        raise PredictError(f"--image={path}: no such file", path=path)
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL raises many types for a bad file
        raise PredictError(f"--image={path}: not an image PIL can read "
                           f"({type(err).__name__}: {first_line(err)})", path=path) from None


def load_image(path: str) -> np.ndarray:
    """The image as uint8 RGB [H, W, 3]."""
    check_image(path)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), np.uint8)
    except Exception as err:  # truncated data shows only when decoding
        raise PredictError(f"--image={path}: cannot decode it ({type(err).__name__}: "
                           f"{first_line(err)})", path=path) from None
