"""Every flagfile in flags/ parses with the real CLI's flags and passes the run's
configuration check, without loading data or weights or training anything.

The flagfile is parsed by absl, as `python -m nettailor_tf.main --flagfile=...`
parses it, into a private copy of the CLI's flag registry (the global FLAGS is
left alone); `config.from_flags` turns it into the `Config` main() would
build, and `Config.validate()` and the backbone checks run as main() runs them.  The one
thing that cannot hold here is that a `--backbone_weights` file the user
produces (a torchvision .pth, an imagenet12-trained WRN-26) exists: its name is
checked against what the loader reads for that backbone, and validation then
runs with an empty stand-in file of the same kind.
"""
import copy
import dataclasses
import functools
import os
import re

import pytest

from nettailor_tf.decathlon import DOMAINS

FLAGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "flags")
FLAGFILES = sorted(f for f in os.listdir(FLAGS_DIR) if f.endswith(".cfg"))
DECATHLON = [d for d in DOMAINS if d != "imagenet12"]

# the published demos (the published demos; ResNet-34 at 224, max_skip 3, wd 5e-4).
# stage: (epochs, batch size, lr, decay epochs); prune: (N, proxy threshold).
PAPER = {
    "paper_svhn.cfg": {"teacher": (20, 64, 0.01, 8), "student": (20, 32, 0.1, 8),
                       "finetune": (20, 32, 0.01, 8), "prune": (11, 0.075)},
    "paper_flowers102.cfg": {"teacher": (50, 64, 0.01, 20), "student": (50, 32, 0.1, 20),
                             "finetune": (60, 32, 0.01, 20), "prune": (7, 0.04)},
    "paper_voc.cfg": {"teacher": (50, 64, 0.01, 20), "student": (50, 32, 0.1, 20),
                      "finetune": (60, 32, 0.01, 20), "prune": (3, 0.1)},
}
# the published demos: svhn and omniglot crop 64; aircraft, daimlerpedcls,
# cifar100, gtsrb and dtd work at 72; the others crop 64.
DECATHLON_SIZE = {"aircraft": 72, "cifar100": 72, "daimlerpedcls": 72, "dtd": 72, "gtsrb": 72,
                  "omniglot": 64, "svhn": 64, "ucf101": 64, "vgg-flowers": 64}


@pytest.fixture(scope="module")
def cli():
    """The CLI module, with backbone construction cached for this module's tests:
    validate() only reads a backbone's block count and minimum input size, and
    building ResNet-34 thirteen times would cost more than everything else."""
    from nettailor_tf import main
    from nettailor_tf.model import backbones

    real = backbones.build_backbone
    backbones.build_backbone = functools.lru_cache(maxsize=None)(real)
    yield main
    backbones.build_backbone = real


def parse(cli, name, monkeypatch):
    """(Config, parsed flag values) exactly as main() would build them."""
    values = copy.deepcopy(cli.FLAGS)  # the CLI's definitions, private values
    leftover = values(["nettailor_tf", f"--flagfile={os.path.join(FLAGS_DIR, name)}"])
    assert leftover == ["nettailor_tf"], f"{name}: lines that are not --flags: {leftover[1:]}"
    from nettailor_tf.settings import config as config_lib

    return config_lib.from_flags(values), values


def flag_lines(name):
    with open(os.path.join(FLAGS_DIR, name), encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_expected_flagfiles_exist():
    expected = {"quickstart.cfg", *PAPER, *(f"decathlon_{d}.cfg" for d in DECATHLON)}
    assert expected <= set(FLAGFILES), sorted(expected - set(FLAGFILES))


@pytest.mark.parametrize("name", FLAGFILES)
def test_flagfile_parses_and_validates(cli, name, monkeypatch, tmp_path):
    from nettailor_tf.model import backbones
    from nettailor_tf.run import artifacts

    config, _ = parse(cli, name, monkeypatch)
    weights = config.backbone_weights
    if weights not in ("imagenet", "random") and not os.path.isfile(weights):
        # A file the user produces: what the loader reads for this backbone?
        if weights.endswith(".weights.h5"):
            suffix = ".weights.h5"
        else:
            suffix = os.path.splitext(weights)[1]
            assert suffix in (".pth", ".pt"), f"{name}: --backbone_weights={weights}"
            assert config.backbone in backbones._TORCH_LAYOUTS, (
                f"{name}: {config.backbone} has no torch layout; it needs a .weights.h5")
        stand_in = tmp_path / f"stand-in{suffix}"
        stand_in.write_bytes(b"")
        config = dataclasses.replace(config, backbone_weights=str(stand_in))
    config.validate()
    artifacts.check_backbone_settings(config)


@pytest.mark.parametrize("name", FLAGFILES)
def test_flagfile_sets_each_flag_once_and_states_its_command(name):
    names = [re.match(r"--(?:no)?([a-z_0-9]+)", line).group(1) for line in flag_lines(name)]
    assert len(names) == len(set(names)), f"{name} sets a flag twice"
    with open(os.path.join(FLAGS_DIR, name), encoding="utf-8") as f:
        header = f.read()
    assert f"python -m nettailor_tf.main --flagfile=flags/{name}" in header


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_flagfiles_follow_the_published_schedules(cli, name, monkeypatch):
    config, _ = parse(cli, name, monkeypatch)
    expected = PAPER[name]
    assert (config.backbone, config.image_size, config.max_skip) == ("resnet34", 224, 3)
    assert (config.complexity_coeff, config.teacher_coeff) == (0.3, 10.0)
    for stage in ("teacher", "student", "finetune"):
        s = getattr(config, stage)
        assert (s.epochs, s.batch_size, s.learning_rate, s.decay_epochs) == expected[stage], stage
        assert s.weight_decay == 5e-4
        assert not s.plateau, f"{stage}: the published schedules have a fixed length"
    assert (config.prune_universal, config.prune_proxy_threshold) == expected["prune"]
    assert not config.prune_search
    assert config.backbone_weights.endswith(".pth")


@pytest.mark.parametrize("domain", DECATHLON)
def test_decathlon_flagfiles_use_wrn26_on_their_domain(cli, domain, monkeypatch):
    config, _ = parse(cli, f"decathlon_{domain}.cfg", monkeypatch)
    assert config.tasks == (f"tfds:visual_domain_decathlon/{domain}",)
    assert (config.backbone, config.image_size) == ("wrn26", DECATHLON_SIZE[domain])
    # No packaged WRN-26 weights: a .weights.h5 the user produces.
    assert config.backbone_weights.endswith(".weights.h5")
    assert config.workdir == f"runs/decathlon_{domain}"
