"""The latency cost model: branches timed with LiteRT, cached, read back,
fingerprinted, and used by the complexity loss and the predictions."""
import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from nettailor_tf.latency import measure as latency_measure, table as lt
from nettailor_tf.model import backbones, complexity, pruning, student_network
from nettailor_tf.settings import config as config_lib
from nettailor_tf.stages import nettailor as nettailor_stage


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    """The tiny backbone's table at 16 px, measured once for the module."""
    cache = str(tmp_path_factory.mktemp("latency_cache"))
    table, cached = latency_measure.cached_table("tiny", 16, 1, 2, cache)
    assert not cached
    return table, cache


def tiny_plan(max_skip=2):
    return student_network.Plan.full(len(backbones.build_backbone("tiny").blocks), max_skip)


def test_every_branch_of_the_student_is_timed(tiny_table):
    table, _ = tiny_table
    plan = tiny_plan()
    samples = {lt.sample_key(i) for i in range(lt.SAMPLE_PLANS)}
    expected = {"empty", "stem", "head", lt.TEACHER_KEY, lt.STUDENT_KEY} | samples
    for l, block in enumerate(plan.blocks):
        expected |= {lt.universal_key(l), lt.mix_key(l)}
        expected |= {lt.proxy_key(l, s) for s in block.proxy_sources}
    assert set(table.entries) == expected
    assert all(0 < ms < 50 for ms in table.entries.values()), table.entries
    # One Invoke's fixed cost is what an empty signature takes: less than any
    # branch, up to the medians' noise where a branch (a 16 px mix, an add)
    # costs next to nothing on top (0.85 against 0.84 us once, 100 runs).
    assert table.invoke_ms <= 1.1 * min(v for k, v in table.entries.items() if k != "empty")
    assert table.invoke_ms < table.entries["stem"]
    assert table.entries[lt.STUDENT_KEY] > table.entries[lt.TEACHER_KEY]
    assert (table.backbone, table.image_size, table.threads, table.max_skip) == ("tiny", 16, 1, 2)
    # A network runs its parts in the order the table timed them.
    assert lt.plan_keys(plan) == [k for k in table.entries
                                  if k != "empty" and not k.startswith(lt.NETWORK_PREFIX)]
    # The sampled networks' plans are kept: the table alone can refit itself.
    assert set(table.calibration_plans) == samples
    # Branches and networks were timed in the same rounds: one load check.
    assert table.other_load_cores is None or table.other_load_cores >= 0


def _synthetic(table, base, slope, keys=None):
    """`table` with its whole networks replaced by what the model
    invoke + S * (base + slope * S / S_full) says of them."""
    networks = table.calibration_networks()
    full = table.parts_ms(networks[lt.STUDENT_KEY])
    entries = {k: v for k, v in table.entries.items() if not k.startswith(lt.NETWORK_PREFIX)}
    for key, plan in networks.items():
        if keys is None or key in keys:
            parts = table.parts_ms(plan)
            entries[key] = table.invoke_ms + parts * (base + slope * parts / full)
    return dataclasses.replace(table, entries=entries)


def test_the_calibration_is_fitted_on_the_whole_networks_timed_with_the_branches(tiny_table):
    """Networks that follow the model exactly give back its factor, and a
    held-out lean network is then predicted exactly: the smaller a network,
    the smaller the factor from its parts to it (a pass over every branch
    evicts what a small network keeps cached)."""
    table, _ = tiny_table
    synthetic = _synthetic(table, 0.7, 0.3)
    fit = synthetic.calibration()
    assert fit.networks == 2 + lt.SAMPLE_PLANS
    assert (fit.base, fit.slope) == pytest.approx((0.7, 0.3), rel=1e-6)
    assert fit.max_error == pytest.approx(0, abs=1e-9)
    lean = student_network.Plan([student_network.BlockPlan(l == 0, list(b.proxy_sources[:1]))
                                 for l, b in enumerate(tiny_plan().blocks)])
    parts = table.parts_ms(lean)
    truth = table.invoke_ms + parts * (0.7 + 0.3 * parts / fit.full_ms)
    assert synthetic.predict_ms(lean) == pytest.approx(truth, rel=1e-6)
    # One factor for every network (the parts' sum scaled) over-predicts it.
    teacher = student_network.Plan.backbone_only(len(tiny_plan().blocks))
    one_factor = ((synthetic.entries[lt.TEACHER_KEY] - table.invoke_ms)
                  / table.parts_ms(teacher))
    assert table.invoke_ms + parts * one_factor > 1.03 * truth
    # The teacher and the full student alone (a phone's table): both exact.
    two = _synthetic(table, 0.7, 0.3, keys=(lt.TEACHER_KEY, lt.STUDENT_KEY))
    assert two.calibration().networks == 2
    assert two.predict_ms(teacher) == pytest.approx(two.entries[lt.TEACHER_KEY], rel=1e-6)
    assert two.predict_ms(tiny_plan()) == pytest.approx(two.entries[lt.STUDENT_KEY], rel=1e-6)
    uncalibrated = dataclasses.replace(table, entries={
        k: v for k, v in table.entries.items() if not k.startswith(lt.NETWORK_PREFIX)})
    assert uncalibrated.calibration().networks == 0
    assert uncalibrated.cost_ms("stem") == uncalibrated.raw_cost_ms("stem")


def test_a_fit_that_would_price_a_smaller_network_higher_gives_way_to_one_factor(tiny_table):
    """Noise can make the whole networks fall as their parts grow: the fit
    then keeps one factor, so a cheaper plan is never predicted slower."""
    table, _ = tiny_table
    synthetic = _synthetic(table, 2.0, -1.5)  # the factor falls steeply with size
    fit = synthetic.calibration()
    assert fit.slope == 0 and fit.base > 0
    teacher = student_network.Plan.backbone_only(len(tiny_plan().blocks))
    assert synthetic.predict_ms(teacher) < synthetic.predict_ms(tiny_plan())


def test_the_measured_calibration_reproduces_its_networks(tiny_table):
    table, _ = tiny_table
    fit = table.calibration()
    assert fit.base > 0 and fit.factor(fit.full_ms) > 0
    for key, plan in table.calibration_networks().items():
        assert table.predict_ms(plan) == pytest.approx(table.entries[key],
                                                       rel=fit.max_error + 1e-6)


def test_an_older_table_is_stale_and_the_cache_measures_a_new_one(tiny_table, tmp_path):
    """A format-2 table (teacher and full student only) still loads, as a
    phone's table would; the cache does not hand it out: the format is in
    the file name."""
    table, cache = tiny_table
    old = dataclasses.replace(table, format=2, calibration_plans={}, entries={
        k: v for k, v in table.entries.items() if not k.startswith(lt.sample_key(0)[:-1])})
    path = tmp_path / "old.json"
    old.save(str(path))
    loaded = lt.LatencyTable.load(str(path))
    assert loaded.stale and not table.stale
    assert loaded.calibration().networks == 2
    assert all(name.endswith(f"_f{lt.TABLE_FORMAT}.json") for name in _tables(cache))


def _tables(cache):
    """The tables in a cache (beside them, the folder of converted files)."""
    return [name for name in os.listdir(cache) if name.endswith(".json")]


def test_the_table_is_cached_and_reloaded_with_the_same_fingerprint(tiny_table):
    table, cache = tiny_table
    again, cached = latency_measure.cached_table("tiny", 16, 1, 2, cache)
    assert cached
    assert again.entries == table.entries
    assert again.fingerprint() == table.fingerprint()
    # Another image size is another table, measured, not the cached one.
    files = _tables(cache)
    assert len(files) == 1 and files[0].startswith("tiny_16_t1_skip2_")


def test_the_fingerprint_follows_the_content_not_the_path(tiny_table, tmp_path):
    table, _ = tiny_table
    path = tmp_path / "copy.json"
    table.save(str(path))
    copy = lt.LatencyTable.load(str(path))
    assert copy.fingerprint() == table.fingerprint()
    changed = dataclasses.replace(copy, entries={**copy.entries, "stem": copy.entries["stem"] * 2})
    assert changed.fingerprint() != table.fingerprint()


def test_prediction_sums_the_live_branches_and_one_invoke(tiny_table):
    table, _ = tiny_table
    plan = tiny_plan()
    cost = table.cost_ms
    teacher = student_network.Plan.backbone_only(len(plan.blocks))
    fit = table.calibration()
    parts = table.raw_cost_ms("stem") + table.raw_cost_ms("head") + sum(
        table.raw_cost_ms(lt.universal_key(l)) for l in range(len(plan.blocks)))
    assert table.parts_ms(teacher) == pytest.approx(parts)
    assert table.predict_ms(teacher) == pytest.approx(table.invoke_ms + parts * fit.factor(parts))
    # A branch is priced at the full student's factor.
    assert cost("stem") == pytest.approx(table.raw_cost_ms("stem") * fit.factor(fit.full_ms))
    # The full student pays for every proxy and mix on top of the teacher's network.
    assert table.predict_ms(plan) > table.predict_ms(teacher)
    lean = pruning.prune_plan(plan, [np.array([0.1] + [0.9 / len(b.proxy_sources)] * len(
        b.proxy_sources)) for b in plan.blocks], 1, 0.05, 0.01)
    assert table.predict_ms(lean) < table.predict_ms(plan)


def test_the_complexity_loss_prices_branches_from_the_table(tiny_table, tmp_path):
    """--complexity_cost=latency: each branch's share is its milliseconds over
    the universal network's, where flops gives multiply-adds."""
    table, _ = tiny_table
    path = tmp_path / "table.json"
    table.save(str(path))
    config = config_lib.Config(workdir=str(tmp_path), tasks=("digits",), backbone="tiny",
                               image_size=16, max_skip=2, complexity_cost="latency",
                               latency_table=str(path))
    backbone = backbones.build_backbone("tiny")
    plan = tiny_plan()
    costs = nettailor_stage.branch_costs(config, backbone, plan)
    norm = table.universal_network_ms(len(plan.blocks))
    assert costs[1][0] == pytest.approx(table.cost_ms("universal1") / norm)
    assert costs[1][2] == pytest.approx(table.cost_ms(lt.proxy_key(1, plan.blocks[1]
                                                                   .proxy_sources[1])) / norm)
    flops = nettailor_stage.branch_costs(dataclasses.replace(config, complexity_cost="flops"),
                                         backbone, plan)
    assert flops != costs
    # The loss term: same formula, other prices.
    alphas = [tf.constant(np.full(len(plan.branch_sources(l)), 1 / len(plan.branch_sources(l)),
                                  np.float32)) for l in range(len(plan.blocks))]
    by_latency = float(complexity.expected_complexity(alphas, costs, plan))
    by_flops = float(complexity.expected_complexity(alphas, flops, plan))
    assert by_latency != pytest.approx(by_flops)
    scaled = [[2 * c for c in row] for row in costs]
    assert float(complexity.expected_complexity(alphas, scaled, plan)) == pytest.approx(
        2 * by_latency, rel=1e-5)
    # The ledger records which table priced the student.
    assert nettailor_stage.cost_identity(config) == {
        "complexity_cost": f"latency:{table.fingerprint()}"}
    assert nettailor_stage.cost_identity(dataclasses.replace(config,
                                                             complexity_cost="flops")) == {}


@pytest.mark.parametrize("content, message", [
    ("not json", "is not JSON"),
    (json.dumps({"format": 99}), f"or {lt.TABLE_FORMAT}"),
    (json.dumps({"format": lt.TABLE_FORMAT, "backbone": "tiny"}), "missing or malformed field"),
    (json.dumps({"format": lt.TABLE_FORMAT, "backbone": "tiny", "image_size": 16, "threads": 1,
                 "max_skip": 2, "entries": {"stem": -1}}), "are not milliseconds"),
])
def test_a_bad_table_file_is_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "table.json"
    path.write_text(content)
    with pytest.raises(lt.LatencyTableError) as error:
        lt.LatencyTable.load(str(path))
    assert message in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_a_table_for_other_settings_is_refused(tiny_table):
    table, _ = tiny_table
    with pytest.raises(lt.LatencyTableError, match="measured for tiny at 16 px"):
        table.check_fits("tiny", 32, 2)
    lean = dataclasses.replace(table, entries={k: v for k, v in table.entries.items()
                                               if k != "universal1"})
    with pytest.raises(lt.LatencyTableError, match="no entry 'universal1'"):
        lean.predict_ms(tiny_plan())


def test_prediction_matches_the_exported_network(tmp_path):
    """A pruned plan exported as the export stage does and timed whole,
    against the table's prediction from its parts (the tiny backbone at
    48 px: EfficientNet-Lite0's figures, within 9% at 64 and 160 px on a
    quiet machine, are in the README).  With the suite's two workers timing
    at once, a factor of 1.6 still catches a branch missed or counted
    twice."""
    from exporters import timing

    table, _ = latency_measure.cached_table("tiny", 48, 1, 2, str(tmp_path / "cache"))
    backbone = backbones.build_backbone("tiny")
    full = tiny_plan()
    rng = np.random.default_rng(0)
    alphas = [rng.dirichlet(np.ones(len(full.branch_sources(l)))) for l in range(len(full.blocks))]
    plan = pruning.prune_plan(full, alphas, 1, 0.2, 0.01)
    assert plan.counts()["proxies_kept"] < sum(len(b.proxy_sources) for b in full.blocks)
    path = tmp_path / "pruned.tflite"
    path.write_bytes(latency_measure.whole_network_content(backbone, plan, 48))
    image = rng.integers(0, 256, (1, 48, 48, 3), dtype=np.uint8)
    measured = timing.measure(str(path), image, 1, runs=300).median_ms
    predicted = table.predict_ms(plan)
    assert measured / 1.6 < predicted < measured * 1.6, (predicted, measured)
