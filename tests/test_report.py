"""report.md: the tables, and results that break the method's promise named as findings."""
import json

from nettailor_tf.run.report import Report, findings, render_markdown


def _task(student=0.98, pruned=0.975, entropy=0.2, pruned_flops=50):
    return {"num_classes": 10,
            "teacher": {"accuracy": 0.97, "val_accuracy": 0.96, "params": 10, "flops": 100},
            "student": {"accuracy": student, "val_accuracy": student, "gates": [[1.0]],
                        "gate_entropy": entropy},
            "pruned": {"accuracy": pruned, "val_accuracy": pruned, "flops": pruned_flops,
                       "accuracy_before_finetune": 0.95, "params_total": 5,
                       "params_task_specific": 1, "universal_blocks_kept": 8,
                       "proxies_kept": 3}}


def test_a_good_result_has_no_finding():
    assert findings(_task()) == []


def test_each_broken_promise_is_named():
    notes = findings(_task(student=0.15, pruned=0.90, entropy=0.9, pruned_flops=100))
    assert len(notes) == 4
    text = " ".join(notes)
    assert "closer to chance" in text and "diffuse" in text
    assert "7.00 points below its teacher" in text and "no multiply-adds" in text
    search = _task()
    search["pruned"]["prune_search"] = {"rule": "allowance", "met": False}
    assert "loses more than the allowance" in findings(search)[0]
    search["pruned"]["prune_search"] = {"rule": "budget", "met": False, "flops_fraction": 0.62}
    assert findings(search) == ["the budget is out of reach: the leanest network the gates "
                                "allow costs 0.62 of the teacher's multiply-adds, and that is "
                                "what was kept."]
    search["pruned"]["prune_search"]["met"] = True
    assert findings(search) == []


def test_a_stage_that_ended_with_its_starting_weights_is_a_finding():
    task = _task()
    task["pruned"].update(stopped="plateau", best_step=0, val_loss=0.40001, converged=True)
    assert findings(task) == ["the finetune stage never improved on its starting weights and "
                              "ends with them (validation loss 0.4): its training only made "
                              "them worse; try a lower --finetune_lr."]
    task["pruned"]["best_step"] = 40
    assert findings(task) == []


def test_a_pruned_network_confidently_below_its_teacher_on_test_is_a_finding():
    task = _task(pruned=0.97)  # the same accuracy as the teacher's: no gap finding
    paired = {"images": 1000, "difference": -0.012, "standard_error": 0.004, "lower": -0.0171,
              "upper": -0.0069, "a_only": 3, "b_only": 15}
    task["pruned"]["vs_teacher"] = {"test": paired}
    assert findings(task) == ["on the test images the pruned network is below its teacher with "
                              "confidence: -1.20 points, at best -0.69 (paired, 1000 images)."]
    task["pruned"]["vs_teacher"]["test"] = {**paired, "upper": 0.001}  # could be none
    assert findings(task) == []


def test_a_quantised_file_that_changed_the_predictions_is_named():
    task = _task()
    task["tflite"] = {"float32": {"accuracy": 0.975, "top1_agreement": 1.0, "bytes": 1},
                      "dynamic": {"accuracy": 0.89, "top1_agreement": 0.889, "bytes": 1},
                      "int8": {"accuracy": 0.972, "top1_agreement": 0.99, "bytes": 1},
                      "int4_weights": {"accuracy": 0.96, "top1_agreement": 0.99, "bytes": 1}}
    notes = findings(task)
    assert notes == ["the dynamic file agrees with its Keras model on 88.90% of the test images "
                     "only and loses 8.50 points of accuracy against the float32 one: "
                     "quantisation changed its predictions.",
                     "the int4_weights file loses 1.50 points of accuracy against the float32 "
                     "one: quantisation changed its predictions."]
    table = "\n".join(render_markdown({"backbone": "tiny", "image_size": 16,
                                        "tasks": {"t": task}}).splitlines())
    assert "| NetTailor | **dynamic (finding)** |" in table
    assert "| NetTailor | int8 |" in table and "| NetTailor | float32 |" in table


def test_a_mixed_file_that_misses_its_budget_is_a_finding():
    task = _task()
    summary = {"layers": 37, "kept_layers": 37, "kept_as": "int8", "budget": 0.0069,
               "selection_accuracy": 0.9586, "selection_float32_accuracy": 0.9724,
               "met_budget": False}
    task["tflite"] = {"float32": {"accuracy": 0.99, "top1_agreement": 1.0, "bytes": 1},
                      "mixed": {"accuracy": 0.99, "top1_agreement": 1.0, "bytes": 1,
                                "mixed": summary}}
    assert findings(task) == [
        "the mixed file misses its budget even with all 37 layers kept in int8 (95.86% against "
        "float32's 97.24% on the selection split): these weights need more than int8; ship "
        "float16 or float32."]
    task["tflite"]["mixed"]["mixed"] = {**summary, "kept_layers": 9, "met_budget": True}
    assert findings(task) == []


def test_predicted_latency_is_tabled_beside_the_measured_one():
    """Every row says how far its prediction was off, against the file timed
    in the table's rounds and against the benchmark's timing (with that
    timing's load); a busy table is named."""
    task = _task()
    task["pruned"].update(predicted_latency_ms=0.65, predicted_latency_measured_ms=0.6)
    task["teacher"]["predicted_latency_ms"] = 0.85
    busy = {"threads": 1, "runs": 100, "median_ms": 0.7, "p10_ms": 0.6, "p90_ms": 0.8,
            "other_load_cores": 0.9, "busy": True}
    task["tflite"] = {"float32": {"accuracy": 0.975, "top1_agreement": 1.0, "bytes": 1,
                                  "latency_ms": 0.70, "latency": {"1": busy}}}
    task["teacher_tflite"] = {"float32": {"accuracy": 0.98, "top1_agreement": 1.0, "bytes": 1,
                                          "latency_ms": 0.80}}
    table = {"fingerprint": "ab" * 32, "device": "a CPU", "other_load_cores": 0.1,
             "calibration": {"networks": 6, "max_error": 0.031}}
    data = {"backbone": "tiny", "image_size": 16, "tasks": {"t": task},
            "latency_prediction_table": table}
    text = render_markdown(data)
    assert "## Predicted against measured latency" in text
    assert "| t | NetTailor | 0.650 | 0.600 | +8% | 0.700 | -7% | 0.90 (busy) |" in text
    assert "| t | teacher | 0.850 | ? | ? | 0.800 | +6% | ? |" in text
    assert "6 whole networks it is calibrated on (largest error on them 3%)" in text
    assert "other processes: 0.10 cores" in text and "busy machine" not in text
    table.update(busy=True, other_load_cores=0.8)
    assert "**Timed on a busy machine** (other processes kept 0.80 cores busy)" in \
        render_markdown(data)


def test_latency_shows_its_spread_and_a_busy_machine_is_a_finding(tmp_path):
    quiet = {"threads": 1, "runs": 100, "median_ms": 0.812, "p10_ms": 0.8, "p90_ms": 0.85,
             "other_load_cores": 0.02, "busy": False}
    busy = {**quiet, "threads": 2, "median_ms": 7.4, "p10_ms": 0.9, "p90_ms": 12.0,
            "other_load_cores": 1.3, "busy": True}
    task = _task()
    task["tflite"] = {"float32": {"accuracy": 0.975, "top1_agreement": 1.0, "bytes": 10**6,
                                  "latency": {"1": quiet, "2": busy}}}
    notes = findings(task)
    assert len(notes) == 1
    assert notes[0].startswith("the latencies at 2 thread(s) were timed while other processes "
                               "kept 1.3 cores busy")
    assert "--restart_from=benchmark" in notes[0]
    report = Report(str(tmp_path), "tiny", 16)
    report.data["tasks"]["digits"] = task
    report.save()
    text = (tmp_path / "report.md").read_text()
    assert "| 0.812 [0.800, 0.850] | 7.400 [0.900, 12.000] (busy) |" in text
    task["tflite"]["float32"]["latency"]["2"] = {**busy, "busy": False}
    assert findings(task) == []


def test_markdown_shows_validation_pre_finetune_and_findings(tmp_path):
    report = Report(str(tmp_path), "tiny", 16)
    report.data["tasks"]["digits"] = _task(pruned=0.90)
    report.save()
    text = (tmp_path / "report.md").read_text()
    assert "| fine-tuned teacher | 97.00% | 96.00% |" in text
    assert "| NetTailor pruned, before fine-tuning | 95.00% |" in text
    assert "**Finding:** the pruned network is 7.00 points below its teacher." in text
    assert "gate entropy 0.200" in text
    assert json.loads((tmp_path / "report.json").read_text())["tasks"]["digits"]["pruned"][
        "accuracy"] == 0.90
    assert render_markdown(report.data) == text


def test_a_damaged_report_is_one_clear_error(tmp_path):
    import pytest

    from nettailor_tf.run.workdir import WorkdirError

    (tmp_path / "report.json").write_text('{"backbone": "tiny", "tas')
    with pytest.raises(WorkdirError, match=r"report.json cannot be read .*delete it"):
        Report(str(tmp_path), "tiny", 16)


def test_the_bundle_memory_table():
    from nettailor_tf.run.report import render_markdown

    bundle = {"savedmodel_path": "bundle/savedmodel", "savedmodel_variables": 3,
              "signatures": {"a": "a"}, "universal_params": 10, "task_specific_params": {"a": 1},
              "variants": {}, "memory_mb": {"baseline": 43.8, "separate_files": 53.9,
                                            "separate_files_weight_cache": 37.3,
                                            "bundle": 47.5, "bundle_weight_cache": 26.4}}
    text = render_markdown({"backbone": "tiny", "image_size": 16, "tasks": {}, "bundle": bundle})
    assert "| XNNPACK weight cache | 37.3 | 26.4 |" in text and "runtime's 43.8 MB" in text
    assert "in memory" not in text  # a report from before that way was measured
    bundle["memory_mb"].update(separate_files_in_memory_cache=36.1, bundle_in_memory_cache=23.4)
    text = render_markdown({"backbone": "tiny", "image_size": 16, "tasks": {}, "bundle": bundle})
    assert "| XNNPACK weight cache in memory (`:memory`, no file) | 36.1 | 23.4 |" in text


def test_report_md_gives_the_prune_decision_and_the_teacher_comparison_with_evidence():
    task = _task()
    task["pruned"]["prune_search"] = {
        "rule": "allowance", "chosen": 9, "allowance": 0.25, "met": True,
        "damage": {"images": 4000, "difference": 0.1027, "standard_error": 0.0049}}
    task["pruned"]["vs_teacher"] = {"test": {"images": 1000, "difference": -0.008,
                                             "standard_error": 0.0053, "lower": -0.0148,
                                             "upper": -0.0012}}
    text = render_markdown({"backbone": "tiny", "image_size": 16, "tasks": {"t": task}})
    assert ("Prune search (allowance): N=9 universal blocks cut; as pruned, the student's "
            "accuracy minus this network's was +10.27 +- 0.49 points on 4000 images, held to "
            "the allowance 25.00 points.") in text
    assert ("Against its teacher on the test images, image by image: -0.80 +- 0.53 points on "
            "1000 images (90% bounds -1.48 to -0.12).") in text
    task["pruned"]["prune_search"].update(rule="budget", flops_budget=0.5)
    text = render_markdown({"backbone": "tiny", "image_size": 16, "tasks": {"t": task}})
    assert "Prune search (budget): N=9" in text and "held to --flops_budget 0.5." in text
