"""The prune stage: which universal blocks and proxies each task keeps
(the search for how many is `prune_search`)."""
from __future__ import annotations

import os

from absl import logging

from nettailor_tf.model import complexity, pruning
from nettailor_tf.run import architecture_figure, artifacts
from nettailor_tf.run.report import Report
from nettailor_tf.run.workdir import Workdir
from nettailor_tf.settings.config import Config
from nettailor_tf.stages import prune_search
from nettailor_tf.stages.nettailor import gate_values


def run_prune(config: Config, strategy, task, report: Report) -> bool:
    """Cuts weak universal blocks and proxies, then every dead path; saves the plan."""
    path = Workdir(config.workdir).plan(task.name)
    if os.path.exists(path):
        if report.get(task.name, "architecture_png") is None:
            # Killed after the plan (the stage's commit point) was written but
            # before its drawing was: draw it now from the same inputs.
            plan, _ = pruning.load_plan(path)
            student, backbone = artifacts.trained_student(config, task)
            _draw_architecture(config, task, report, student, plan, backbone)
        logging.info("%s: prune stage already done (%s); skipping", task.name, path)
        return True
    logging.info("%s: prune stage: reading the student's gates", task.name)
    student, backbone = artifacts.trained_student(config, task)
    alphas = [a.numpy() for a in student.alphas()]
    search = None
    if config.searches_prune:
        try:
            search = prune_search.PruneSearch(config, strategy, task, report, student, alphas,
                                              backbone).run()
        except prune_search.Interrupted:
            logging.info("%s: prune search interrupted (--max_steps); re-run to resume",
                         task.name)
            return False
        num_universal = search["chosen"]
        logging.info(prune_search.describe(task.name, search))
        if not search["met"] and search["rule"] == "allowance":
            logging.warning("%s: prune search: even N=0 (the weak proxies cut) loses more than "
                            "the allowance %.4f against the unpruned student; keeping N=0",
                            task.name, config.prune_allowance)
    else:
        num_universal = config.prune_universal or 0
    pruned = pruning.prune_plan(student.plan, alphas, num_universal,
                                config.prune_proxy_threshold, config.prune_universal_threshold)
    counts = pruned.counts()
    pruning.save_plan(path, pruned, backbone=config.backbone,
                      backbone_weights=config.backbone_weights, image_size=config.image_size,
                      universal_blocks=[l for l, b in enumerate(pruned.blocks) if b.universal],
                      prune_universal=num_universal,
                      prune_proxy_threshold=config.prune_proxy_threshold,
                      prune_universal_threshold=config.prune_universal_threshold,
                      prune_search=search, gates=gate_values(student), **counts)
    png = _draw_architecture(config, task, report, student, pruned, backbone)
    logging.info("%s: pruned to %d universal blocks and %d proxies (%d live blocks of %d); "
                 "architecture drawn in %s", task.name, counts["universal_blocks_kept"],
                 counts["proxies_kept"], counts["blocks_live"], len(pruned.blocks), png)
    return True


def _draw_architecture(config, task, report, student, pruned, backbone) -> str:
    """architecture.png (the student's gates, what pruning kept) and its report entry."""
    paths = Workdir(config.workdir)
    png = paths.architecture_png(task.name)
    architecture_figure.plot_architecture(
        png, f"{task.name}: NetTailor on {config.backbone} (max_skip={config.max_skip})",
        student.plan, gate_values(student), kept_plan=pruned,
        block_flops=complexity.backbone_flops(backbone, config.image_size)["blocks"])
    report.task(task.name)["architecture_png"] = paths.relative(png)
    report.save()
    return png


