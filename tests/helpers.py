"""Shared test helpers (pytest puts tests/ on sys.path, so `import helpers` works)."""
import numpy as np


def randomize_weights(layers, seed, kernel_std=None):
    """Gives kernels, BN values, biases and gate logits non-trivial values.

    A fresh proxy is nearly silent and a fresh BN is the identity, which would
    hide mistakes in folding, routing or pruning.  `kernel_std=None` draws
    He-normal kernels (std sqrt(2 / fan_in)), which keep activations in range
    through a stack of blocks.
    """
    rng = np.random.default_rng(seed)
    if not isinstance(layers, (list, tuple)):
        layers = [layers]
    for layer in layers:
        for v in layer.weights:
            shape = tuple(v.shape)
            if v.name in ("gamma", "moving_variance"):
                v.assign(rng.uniform(0.5, 1.5, shape))
            elif v.name in ("beta", "moving_mean", "bias"):
                v.assign(rng.normal(0.0, 0.2, shape))
            elif v.name == "logits":
                v.assign(rng.normal(0.0, 1.0, shape))
            elif v.name == "kernel":
                std = kernel_std or np.sqrt(2 / int(np.prod(shape[:-1])))
                v.assign(rng.normal(0.0, std, shape))


def task_layers(student):
    """The layers a student owns for its task: proxies, gates, classifier."""
    return ([p for b in student.tailored for p in b.proxies] + [b.gate for b in student.tailored]
            + [student.classifier])


def tiny_inverted_residual_backbone():
    """A small EfficientNet-Lite-like backbone (linear-bottleneck blocks, no
    activation after a block, a shared 1x1 conv head): the block layout
    where a gate scale sits between two universal convolutions, which the
    tiny ResNet-like backbone (a ReLU after each block) does not have."""
    import keras

    from nettailor_tf.model import backbones, layers

    stem = keras.Sequential([
        layers.Normalize((127.0,), (128.0,), name="normalize"),
        layers.ConvBN(8, 3, 2, "same", activation="relu6", name="conv")], name="stem")
    blocks, channels = [], 8
    for index, (out, stride, expand) in enumerate(((8, 1, 1), (16, 2, 4), (16, 1, 4),
                                                  (24, 1, 4))):
        blocks.append(layers.InvertedResidual(channels, out, stride, expand, 3, "same",
                                              name=f"block{index}"))
        channels = out
    head = keras.Sequential([layers.ConvBN(32, 1, activation="relu6", name="conv"),
                             keras.layers.GlobalAveragePooling2D(name="pool")], name="head")
    backbone = backbones.Backbone("tiny_ir", stem, blocks, head, None, 8, 2, 32, padding="same")
    shape = (None, None, None, 3)
    for layer in backbone.layers:
        layer.build(shape)
        shape = layer.compute_output_shape(shape)
    return backbone


def tiny_static_models(plans, num_classes=(5, 7), image_size=16, seed=0, backbone=None):
    """Static (pruned) networks of several tasks over ONE tiny random
    backbone (`backbone`, or the "tiny" one), built through one
    `UniversalLayers` as a bundle builds them: [(keras.Model, student)],
    plus the UniversalLayers."""
    from nettailor_tf.model import backbones, static_graph
    from nettailor_tf.model.student_network import build_student

    backbone = backbone or backbones.build_backbone("tiny")
    randomize_weights(backbone.layers, seed)
    universal = static_graph.UniversalLayers()
    models = []
    for index, (plan, classes) in enumerate(zip(plans, num_classes)):
        student = build_student(backbone, classes, plan, "frozen", image_size)
        randomize_weights(task_layers(student), seed + 1 + index)
        models.append((static_graph.static_model(student, universal=universal, name=f"task{index}"),
                       student))
    return models, universal


def run_in_process(capsys, *args):
    """The CLI's main() on `args`, in this process (no 5 s TensorFlow start
    per case), for error cases: returns (exit code, stderr)."""
    import pytest
    from absl import flags

    from nettailor_tf import main as cli

    flags.FLAGS.unparse_flags()
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(cli.parse_flags(["nettailor_tf", *args]))
    finally:
        flags.FLAGS.unparse_flags()
    return exit_info.value.code, capsys.readouterr().err


def stage_config(workdir, **overrides):
    """A validated Config of the training stages on the tiny backbone and
    mocked svhn_cropped (one epoch each, every step logged and checkpointed)."""
    from nettailor_tf.settings.config import Config
    from nettailor_tf.settings.schedules import Schedule

    one_epoch = Schedule(epochs=1, batch_size=16, learning_rate=0.05, decay_epochs=1)
    values = dict(workdir=str(workdir), tasks=("tfds:svhn_cropped",),
                  stages=("teacher", "student", "prune", "finetune"), backbone="tiny",
                  backbone_weights="random", image_size=16, teacher=one_epoch,
                  student=one_epoch, finetune=one_epoch, prune_universal=1,
                  prune_proxy_threshold=0.0, log_every=1, checkpoint_every=1)
    values.update(overrides)
    config = Config(**values)
    config.validate()
    return config


# --- rate groups (tests/test_train.py, tests/test_checkpoints.py) -------------

def rate_group_problem(seed=0):
    """A two-layer least-squares problem (`seed`: its initialisation) whose
    four variables make three rate groups: kernel 1 and bias 2 at the stage's
    rate, bias 1 at 10x held at the initial rate, kernel 2 at 2x; the kernels
    get weight decay.

    Returns (model, loss: () -> scalar, multipliers, held, decayed)."""
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(seed)
    # Fixed names: a rebuilt problem restores from the first one's checkpoint.
    model = keras.Sequential([keras.layers.Input((4,)),
                              keras.layers.Dense(3, activation="tanh", name="hidden"),
                              keras.layers.Dense(2, name="out")], name="problem")
    rng = np.random.default_rng(0)  # the same data whatever the initialisation
    inputs = tf.constant(rng.normal(size=(8, 4)), tf.float32)
    targets = tf.constant(rng.normal(size=(8, 2)), tf.float32)
    kernel1, bias1, kernel2, _ = model.trainable_variables

    def loss():
        return tf.reduce_mean(tf.square(model(inputs) - targets))
    return (model, loss, [1.0, 10.0, 2.0, 1.0], [bias1], [kernel1, kernel2])


def old_rule_steps(optimizer, variables, loss, multipliers, held, decayed, weight_decay,
                   initial_rate, rates):
    """The loop's rule before rate groups, one step per rate in `rates`: one
    optimizer at the stage's rate, each gradient (plus its coupled decay)
    scaled by its multiplier, a held one's also by initial_rate / rate."""
    import tensorflow as tf
    held_ids, decayed_ids = {id(v) for v in held}, {id(v) for v in decayed}
    for rate in rates:
        optimizer.learning_rate = rate
        with tf.GradientTape() as tape:
            value = loss()
        grads = tape.gradient(value, variables)
        grads = [(g + weight_decay * v if id(v) in decayed_ids else g)
                 * (k * initial_rate / rate if id(v) in held_ids else k)
                 for g, v, k in zip(grads, variables, multipliers)]
        optimizer.apply_gradients(zip(grads, variables))


def separate_optimizer_steps(make_optimizer, variables, loss, multipliers, held, decayed,
                             weight_decay, initial_rate, rates):
    """What per-variable rates mean: an optimizer of its own per variable, at
    multiplier x the rate (x the initial rate when held), one step per rate."""
    import tensorflow as tf
    held_ids, decayed_ids = {id(v) for v in held}, {id(v) for v in decayed}
    optimizers = [make_optimizer(1.0) for _ in variables]
    for rate in rates:
        with tf.GradientTape() as tape:
            value = loss()
        grads = tape.gradient(value, variables)
        for optimizer, g, v, k in zip(optimizers, grads, variables, multipliers):
            optimizer.learning_rate = k * (initial_rate if id(v) in held_ids else rate)
            optimizer.apply_gradients([(g + weight_decay * v if id(v) in decayed_ids else g,
                                        v)])
