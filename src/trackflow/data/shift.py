"""A distribution-shifted stream of labelled digits, for trying the online-learning loop.

:func:`shifted_digits` draws rows of scikit-learn's bundled digits (8x8 images, values 0-16) and
changes how they are written: thicker strokes (grey dilation), a small shift, a small rotation,
noise. The labels stay right, so the shifted rows can be added as a labelled batch
(``trackflow add-batch``) after scoring them showed the drift (``trackflow score``).

At the default strength, the pipeline's model (params.yaml with pretrain 3 and train 5 epochs;
test accuracy 0.985) scores 0.60 on 1000 shifted rows of digits 5-9. After ``trackflow add-batch``
of 600 other shifted rows and ``dvc repro``, the promoted model scores 0.90 on them and still 0.985
on the original test rows: the shift is clear, and learnable. ``strength=0.5`` gives 0.80 before.
scipy (a dependency of scikit-learn) does the image operations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from trackflow.errors import DataError

SIDE = 8  # the digits are SIDE x SIDE images
MAX_VALUE = 16.0  # their pixel values run from 0 to MAX_VALUE
LABEL_COLUMN = "target"


def _thicken(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Thicker strokes: a quarter way (x strength) to each 2x2 neighbourhood's brightest pixel."""
    from scipy import ndimage

    dilated = ndimage.grey_dilation(image, size=(2, 2))
    return image + min(0.25 * strength, 1.0) * (dilated - image)


def _shift(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Moved right by a quarter pixel (x strength), interpolated: the whole stream alike."""
    from scipy import ndimage

    return ndimage.shift(image, (0.0, 0.25 * strength), order=1, mode="constant", cval=0.0)


def _rotate(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Turned about the centre by up to 5 x strength degrees either way."""
    from scipy import ndimage

    angle = rng.uniform(-5.0, 5.0) * strength
    return ndimage.rotate(image, angle, reshape=False, order=1, mode="constant", cval=0.0)


def _noise(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Gaussian noise of standard deviation 0.5 x strength (pixel values run 0-16)."""
    return image + rng.normal(0.0, 0.5 * strength, size=image.shape)


#: The kinds of shift, applied in this order to every row.
SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator, float], np.ndarray]] = {
    "thicken": _thicken,
    "shift": _shift,
    "rotate": _rotate,
    "noise": _noise,
}


def shifted_digits(
    n_rows: int,
    seed: int,
    kinds: Sequence[str] = tuple(SHIFTS),
    strength: float = 1.0,
    classes: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Labelled digits written differently from the bundled ones: a shifted stream.

    Rows are drawn from the bundled digits (of ``classes`` only, if given) without replacement
    while there are enough, with replacement beyond; each gets every shift of ``kinds``, in
    :data:`SHIFTS` order, with its own random draw, and is clipped to 0-16. The same arguments
    give the same table.

    Args:
        n_rows: Rows to make.
        seed: Seed of the draws.
        kinds: Shifts to apply, among :data:`SHIFTS`.
        strength: Scale of every shift (1: the default; 0: only the draw of rows).
        classes: Digits to draw from (default: all ten).

    Returns:
        A table of shape (n_rows, 65): ``pixel_0_0`` ... ``pixel_7_7`` as
        ``load_digits(as_frame=True)`` names them, as float64, then the integer label
        ``target``.

    Raises:
        DataError: An unknown kind, a class not among the digits, or fewer than one row.
    """
    from sklearn.datasets import load_digits

    unknown = [kind for kind in kinds if kind not in SHIFTS]
    if unknown:
        raise DataError(f"unknown shift {unknown}; use some of {', '.join(SHIFTS)}")
    if n_rows < 1 or strength < 0:
        raise DataError(f"need at least one row and a strength >= 0 (got {n_rows}, {strength})")
    digits = load_digits(as_frame=True).frame
    if classes is not None:
        absent = sorted(set(classes) - set(digits[LABEL_COLUMN]))
        if absent:
            raise DataError(f"classes {absent} are not digits; use some of 0-9")
        digits = digits[digits[LABEL_COLUMN].isin(classes)]
    rng = np.random.default_rng(seed)
    drawn = digits.iloc[rng.choice(len(digits), n_rows, replace=n_rows > len(digits))]
    features = [column for column in digits.columns if column != LABEL_COLUMN]
    images = drawn[features].to_numpy(dtype="float64").reshape(-1, SIDE, SIDE)
    for kind in (kind for kind in SHIFTS if kind in kinds):
        images = np.stack([SHIFTS[kind](image, rng, strength) for image in images])
    table = pd.DataFrame(np.clip(images.reshape(n_rows, -1), 0.0, MAX_VALUE), columns=features)
    return table.assign(**{LABEL_COLUMN: drawn[LABEL_COLUMN].to_numpy(dtype="int64")})
