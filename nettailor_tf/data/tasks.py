"""What a task is: `TaskData`, `DataError` and the undecoded source behind a loaded task.

Every loader (memory, tfds_tasks, folders) builds its `TaskData` from an
`UndecodedSource` here, and the validation split and the pipelines read that
source back (`undecoded_split`), so this module is the bottom of the package:
it imports none of its siblings.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import tensorflow as tf

from nettailor_tf.common.errors import NetTailorError

TASK_SPEC_HELP = (
    "accepted task specs: 'mnist5k', 'digits', 'tfds:NAME[/CONFIG]' "
    "(e.g. tfds:svhn_cropped, tfds:visual_domain_decathlon/dtd), "
    "'folder:PATH' (PATH/<class>/<images> or PATH/train/<class>/... + PATH/test/<class>/...)"
)


class DataError(NetTailorError, ValueError):
    """One-line user-facing message: names the task spec and the problem and what would be accepted."""


def task_error(spec: str, problem: str) -> DataError:
    """A `DataError` reading ``task '<spec>': <problem>`` on one line."""
    # Messages end up on one terminal line: flatten anything multi-line.
    text = f"task {spec!r}: {problem}"
    return DataError(" ".join(text.split()))


@dataclasses.dataclass(frozen=True, eq=False)
class UndecodedSplit:
    """Undecoded items of one split: random-access arrays or a sequential stream."""

    items: np.ndarray | None = None  # pixels [N, H, W, 3] uint8, or file paths [N]
    labels: np.ndarray | None = None  # int32 [N]
    stream: tf.data.Dataset | None = None  # (item, label) when there is no random access (tfds)

    def dataset(self) -> tf.data.Dataset:
        """The split's ``(item, label)`` pairs, still undecoded, in stored order."""
        if self.items is not None:
            return tf.data.Dataset.from_tensor_slices((self.items, self.labels))
        assert self.stream is not None
        return self.stream


@dataclasses.dataclass(frozen=True, eq=False)
class UndecodedSource:
    """How a loaded task reads its data cheaply: undecoded items plus a decoder.

    The pipelines shuffle and skip *undecoded* items (file paths, encoded bytes,
    small arrays) and decode only what they keep.
    """

    train: UndecodedSplit
    test: UndecodedSplit
    val: UndecodedSplit | None
    # item -> uint8 [H, W, 3]; None when the items are already pixels.
    decode: Callable[[tf.Tensor], tf.Tensor] | None
    # All images share one static size, so resizing can run on whole batches.
    same_size: bool
    # The public datasets built from this source; a TaskData edited with
    # dataclasses.replace(train=...) no longer matches and uses the generic path.
    public_train: tf.data.Dataset
    public_test: tf.data.Dataset
    public_val: tf.data.Dataset | None = None


@dataclasses.dataclass(frozen=True)
class TaskData:
    """A loaded classification task.

    ``train``/``test`` yield UNBATCHED ``(uint8 image [H, W, 3], int32 label)``;
    images may differ in size.  Tasks may also be constructed by hand with any
    such datasets; the pipelines then shuffle/skip the decoded elements.
    """

    name: str
    spec: str
    num_classes: int
    train: tf.data.Dataset
    test: tf.data.Dataset
    num_train: int
    num_test: int
    augment: str
    # A validation split carved out of the training data by
    # `with_validation_split` (None / 0 before): every choice the pipeline
    # makes is made on it, so the test split is only ever reported.
    val: tf.data.Dataset | None = None
    num_val: int = 0
    # The classes' names in label order (folder names, a tfds ClassLabel's
    # names, the digits "0".."9"), or None when the source names none; an
    # export writes them to its labels files (`label_names`).
    class_names: tuple[str, ...] | None = None
    # Internal fast path set by load_task (not part of the public API): read it
    # with `source_of` / `undecoded_split`, set it with `with_source`.
    _source: UndecodedSource | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.class_names is None:
            return
        names = tuple(str(n) for n in self.class_names)
        if len(names) != self.num_classes:
            raise task_error(self.spec, f"{len(names)} class names for {self.num_classes} "
                                        "classes; give one name per class, in label order")
        object.__setattr__(self, "class_names", names)  # frozen: lists become a tuple


def label_names(task: TaskData) -> tuple[str, ...]:
    """One name per class in label order: the task's `class_names`, or
    ``class_<i>`` where it has none.  Line breaks become spaces and an empty
    name becomes ``class_<i>``, so that each name is one line of a labels file."""
    names = task.class_names or ("",) * task.num_classes
    lines = (" ".join(name.splitlines()).strip() for name in names)
    return tuple(line or f"class_{i}" for i, line in enumerate(lines))


def build_source(train: UndecodedSplit, test: UndecodedSplit,
                 decode: Callable[[tf.Tensor], tf.Tensor] | None, same_size: bool,
                 val: UndecodedSplit | None = None) -> UndecodedSource:
    """An `UndecodedSource` whose public datasets decode `decode(item)` and
    cast labels to int32 (or pass the items through when `decode` is None)."""
    def public(split: UndecodedSplit) -> tf.data.Dataset:
        ds = split.dataset()
        if decode is None:
            return ds
        return ds.map(lambda item, label: (decode(item), tf.cast(label, tf.int32)),
                      num_parallel_calls=tf.data.AUTOTUNE)

    return UndecodedSource(train=train, test=test, val=val, decode=decode, same_size=same_size,
                           public_train=public(train), public_test=public(test),
                           public_val=None if val is None else public(val))


def make_task(name: str, spec: str, num_classes: int, source: UndecodedSource, num_train: int,
              num_test: int, augment: str, class_names=None) -> TaskData:
    """The `TaskData` a loader returns: `source`'s public datasets, with the
    source attached as the pipelines' fast path."""
    return TaskData(name=name, spec=spec, num_classes=num_classes, train=source.public_train,
                    test=source.public_test, num_train=num_train, num_test=num_test,
                    augment=augment, class_names=class_names, _source=source)


def source_of(task: TaskData) -> UndecodedSource | None:
    """The undecoded source `load_task` attached to `task` (None for a hand-built task)."""
    return task._source


def with_source(task: TaskData, source: UndecodedSource, **changes) -> TaskData:
    """`task` with the fields in `changes` replaced and `source` as its fast path."""
    return dataclasses.replace(task, _source=source, **changes)


def undecoded_split(task: TaskData, split: str
                    ) -> tuple[UndecodedSplit | None, Callable | None, bool]:
    """The fast-path undecoded split of a loaded task, if it still matches the task.

    Returns ``(split, decode, same_size)``, or ``(None, None, False)`` for a
    hand-built task or one whose `split` dataset was replaced after loading.
    """
    src = task._source
    public = getattr(task, split)
    if src is None or public is None or public is not getattr(src, f"public_{split}"):
        return None, None, False
    return getattr(src, split), src.decode, src.same_size
