"""Reading one image file for a classification dataset, resized, with an error that names the file."""
import numpy as np
from PIL import Image


def read_resized(path, size, mode):
    """uint8 pixels of ``path`` converted to Pillow ``mode`` ("RGB": [S, S, 3], "L": [S, S]) and resized to
    ``size`` × ``size`` (bilinear); ValueError naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode).resize((size, size), Image.BILINEAR))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None
