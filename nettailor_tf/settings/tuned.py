"""Constants whose values were chosen by measurement, in one place, each with
the measurement that chose it (which runs, which figures), so that a new
measurement shows what it may change and where.

Settings a user may change are options in `config`; these are not.  Pure
Python: every layer that reads settings may import it.
"""
from __future__ import annotations

# --- the prune search (stages/prune_search.py; docs/method.md, "Prune search")

# The gates' own answer, where the search's walk starts: universal blocks that
# give their block under this share of its output.  On the quickstart's
# students (2026-12-02) 7-8 blocks read 0.00-0.04 and the boundary the search
# found was one or two above; starting there took 4 candidates instead of 6.
WEAK_UNIVERSAL = 0.05

# A brief fine-tune still this far below the target halfway through is
# abandoned, a heuristic that trades a rare late recovery for time: a digits
# candidate with 8 universal blocks cut read 41% before fine-tuning, 64%
# after 40 steps and 92% after 80 (quickstart, 2026-12-02), so brief
# fine-tunes much shorter than the recovery are not worth finishing from
# that far below.
ABANDON_MARGIN = 0.10

# --- report.md's findings (run/report.py)

# A student whose gates stayed this close to uniform (entropy over
# log(branches)) has not chosen what to keep: the quickstart's short students
# read 0.55 on digits and 0.60 on mnist5k, the second just flagged: its
# pruned network still matched the teacher, but at 0.64 of its multiply-adds
# rather than under 0.60.
DIFFUSE_GATE_ENTROPY = 0.6

# --- the recommended export file (stages/recommend.py; docs/report_json.md)

# How much slower than float32 with every core a recommended file may be: the
# guard is for the 5-9x of hybrid (dynamic-range) kernels, and two medians of
# the same speed differed by up to 20% on the busy quickstart machine
# (2026-12-07), which dropped float16 from digits' choice at a margin of 1.
ALL_CORES_MARGIN = 1.25

# Accuracy a recommended file may lose against float32 on the selection
# split: the prune search's tolerance on the quickstart, half a point, and
# never less than one image (on digits' 145 validation images half a point
# is 0.7 of one).
RECOMMENDATION_TOLERANCE = 0.005

# --- the training loop (training/train.py)

# Points of a fixed schedule's validation curve per stage (and the last
# epoch): they only draw the curve, and each costs a pass and, for NetTailor
# networks, a BN re-estimation: 2-3 s apiece on the quickstart (2026-12-07),
# where ten a stage took 15-20 s of its student stage.
EVALUATIONS_PER_STAGE = 4

# BN re-estimation batches before a fixed schedule's curve points (of the 32
# that `stages/nettailor.RECALIBRATION_BATCHES` gives the stage's result):
# they decide nothing, and a full one cost ~2 s per point of a quickstart
# student.  Not before the plateau rule's evaluations, which decide: there
# (2026-12-07, the fine-tune of development seeds 0 and 1, each from the same
# student and plan, docs/results/finetune_shorter.json) 8 batches ended with
# a higher validation loss on three of four runs (mnist5k 0.090 and 0.056
# against 0.075 and 0.053, digits 0.070 against 0.041, one run the same) and
# moved the rule's stop by -80 to +160 steps.
BRIEF_RECALIBRATION_BATCHES = 8

# --- the time-left estimate of each stage line (stages/__init__.py)

# Each stage's usual share of a run, relative to the teacher's, read from a
# fresh quickstart on a quiet 2-core machine ("stage N of M ... into the
# run"; 2026-12-07, code 3faebf0): teacher 82 s, student 167 s, prune 60 s,
# fine-tune 119 s (the plateau rule), export 59 s, benchmark 40 s (a
# latency table converted and timed beside the files).  Only the ratios
# matter: the run's own pace so far scales them.
STAGE_WEIGHTS = {"teacher": 1.0, "student": 2.0, "prune": 0.75, "finetune": 1.45,
                 "export": 0.7, "benchmark": 0.5, "submission": 0.3}
