#!/usr/bin/env bash
# GPU check for nettailor_tf: installs the package, shows the GPU, times the
# train step and the input pipeline, runs a short quickstart, and prints ONE
# JSON object with the figures on stdout (progress and logs go to stderr and
# to $OUT/gpu_check.log).  Finishes in under 8 minutes (GPU_CHECK_BUDGET_S).
#
#   bash benchmarks/gpu_check.sh                       # on a GPU machine
#   GPU_CHECK_QUICK=1 GPU_CHECK_INSTALL=0 bash benchmarks/gpu_check.sh   # CPU smoke run
#
# Full sizes (when TensorFlow sees a GPU): teacher and student steps of
# resnet34 at 224 px, batch 64 (random weights); the mnist5k input pipeline at
# the same size and batch, against those steps; the quickstart flagfile with
# one epoch per stage.  Without a GPU the script says so in its JSON ("gpu":
# false, "skipped": [...]) and uses the quick sizes (tiny backbone, 32 px,
# batch 8; quickstart on digits with the tiny backbone), unless
# GPU_CHECK_QUICK=0 forces the full ones.
#
# Environment:
#   OUT                  output folder (default /tmp/gpu_check): gpu_check.json,
#                        gpu_check.log, quickstart_report.json
#   GPU_CHECK_QUICK      1: quick sizes; 0: full sizes; unset: full iff TF sees a GPU
#   GPU_CHECK_INSTALL    0: skip `pip install -e .` (default 1)
#   GPU_CHECK_WHEELS     folder of wheels: install offline from it (--no-index)
#   GPU_CHECK_QUICKSTART 0: skip the quickstart (default 1)
#   GPU_CHECK_BUDGET_S   total seconds for everything (default 470)
#   GPU_CHECK_BACKBONE, GPU_CHECK_IMAGE_SIZE, GPU_CHECK_BATCH_SIZE, GPU_CHECK_TASK
#                        override the benchmark's backbone, size, batch and task
#   PYTHON               interpreter (default python3)
#
# Exit status: 0 when every step that was not skipped succeeded, 1 otherwise;
# the JSON is printed either way.
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
OUT_DIR=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)
mkdir -p "$OUT_DIR" || exit 2
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
rm -f "$OUT_DIR/gpu_check.json" "$OUT_DIR/quickstart_report.json"
# Per-step outputs and the quickstart workdir stay out of $OUT (checkpoints
# and event files are many and large).
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

say() { echo "gpu_check: $*" >&2; echo "== gpu_check: $*" >>"$LOG"; }
skip() { echo "$*" >>"$SCRATCH/skipped"; say "skipped: $*"; }
: >"$SCRATCH/skipped"
: >"$SCRATCH/steps"

# step NAME LIMIT_S CMD...: runs CMD under `timeout` (at most what the budget
# has left), stdout to $SCRATCH/NAME.out, stderr to the log; records
# "NAME rc seconds limit" in $SCRATCH/steps.
step() {
    local name=$1 limit=$2 left rc tic
    shift 2
    left=$(( BUDGET - ($(date +%s) - START) - 15 ))
    if (( left < 20 )); then
        skip "$name: budget of ${BUDGET}s spent"
        return 99
    fi
    (( limit > left )) && limit=$left
    say "$name (timeout ${limit}s): $*"
    tic=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$SCRATCH/$name.out" 2>>"$LOG"
    rc=$?
    echo "$name $rc $(( $(date +%s) - tic )) $limit" >>"$SCRATCH/steps"
    say "$name: rc=$rc after $(( $(date +%s) - tic ))s"
    return $rc
}

# --- install -----------------------------------------------------------------
if [[ ${GPU_CHECK_INSTALL:-1} != 0 ]]; then
    if [[ -n ${GPU_CHECK_WHEELS:-} ]]; then
        step install 240 "$PY" -m pip install -q --no-index --find-links "$GPU_CHECK_WHEELS" -e . \
            || step install_no_isolation 240 "$PY" -m pip install -q --no-index \
                   --find-links "$GPU_CHECK_WHEELS" --no-build-isolation -e .
    else
        # Offline, build isolation cannot fetch setuptools: retry without it.
        step install 240 "$PY" -m pip install -q -e . \
            || step install_no_isolation 240 "$PY" -m pip install -q --no-build-isolation -e .
    fi
else
    skip "install: GPU_CHECK_INSTALL=0"
fi

# --- the GPU as the driver sees it ------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi 2>&1 | tee -a "$LOG" >&2 || true
    step nvidia_smi 30 nvidia-smi --query-gpu=name,memory.total,driver_version \
        --format=csv,noheader
else
    skip "nvidia-smi: not found (no NVIDIA driver on this machine)"
fi

# --- the GPU as TensorFlow sees it ------------------------------------------
step tf_probe 90 "$PY" -c '
import json, platform
import tensorflow as tf, keras
gpus = tf.config.list_physical_devices("GPU")
names = []
for g in gpus:
    try:
        names.append(tf.config.experimental.get_device_details(g).get("device_name", g.name))
    except Exception:
        names.append(g.name)
print(json.dumps({"tf_version": tf.__version__, "keras_version": keras.__version__,
                  "python": platform.python_version(),
                  "tf_built_with_cuda": tf.test.is_built_with_cuda(), "tf_gpus": names}))
'
TF_GPU=$("$PY" - "$SCRATCH/tf_probe.out" <<'EOF'
import json, sys
try:
    lines = [l for l in open(sys.argv[1]).read().splitlines() if l.startswith("{")]
    print(1 if json.loads(lines[-1])["tf_gpus"] else 0)
except Exception:
    print(0)
EOF
)

if [[ -n ${GPU_CHECK_QUICK:-} ]]; then
    QUICK=$GPU_CHECK_QUICK
    [[ $QUICK != 0 ]] && skip "full sizes: GPU_CHECK_QUICK=$QUICK asked for quick sizes"
elif [[ $TF_GPU == 1 ]]; then
    QUICK=0
else
    QUICK=1
    skip "full sizes (resnet34, 224 px, batch 64): TensorFlow sees no GPU; quick sizes used"
fi
if [[ $QUICK != 0 ]]; then
    BACKBONE=tiny SIZE=32 BATCH=8 STEPS=10 WARMUP=1
    PIPELINE_FLAGS=(--pipeline_batches=50)
    QUICKSTART_FLAGS=(--tasks=digits --image_size=32 --backbone=tiny --backbone_weights=random
                      --prune_universal=2)
else
    BACKBONE=resnet34 SIZE=224 BATCH=64 STEPS=15 WARMUP=3
    PIPELINE_FLAGS=(--pipeline_epochs=2)
    QUICKSTART_FLAGS=()
fi
BACKBONE=${GPU_CHECK_BACKBONE:-$BACKBONE}
SIZE=${GPU_CHECK_IMAGE_SIZE:-$SIZE}
BATCH=${GPU_CHECK_BATCH_SIZE:-$BATCH}
TASK=${GPU_CHECK_TASK:-mnist5k}

# --- train step (teacher and student, synthetic batch) ----------------------
step train_step 150 "$PY" benchmarks/train_step.py --backbone="$BACKBONE" --image_size="$SIZE" \
    --batch_size="$BATCH" --warmup="$WARMUP" --steps="$STEPS"

# --- input pipeline, against those steps ------------------------------------
STEP_JSON=()
if grep -q '^{' "$SCRATCH/train_step.out" 2>/dev/null; then
    STEP_JSON=(--step_json="$SCRATCH/train_step.out")
fi
step input_pipeline 120 "$PY" benchmarks/input_pipeline.py --task="$TASK" --backbone="$BACKBONE" \
    --image_size="$SIZE" --batch_size="$BATCH" --warmup="$WARMUP" --steps="$STEPS" \
    "${PIPELINE_FLAGS[@]}" "${STEP_JSON[@]}"

# --- a short quickstart: every stage, one epoch each -------------------------
if [[ ${GPU_CHECK_QUICKSTART:-1} != 0 ]]; then
    step quickstart 300 "$PY" -m nettailor_tf.main --flagfile=flags/quickstart.cfg \
        --workdir="$SCRATCH/quickstart" --teacher_epochs=1 --student_epochs=1 \
        --finetune_epochs=1 "${QUICKSTART_FLAGS[@]}"
    [[ -f $SCRATCH/quickstart/report.json ]] \
        && cp "$SCRATCH/quickstart/report.json" "$OUT_DIR/quickstart_report.json"
else
    skip "quickstart: GPU_CHECK_QUICKSTART=0"
fi

# --- one JSON object ---------------------------------------------------------
"$PY" - "$SCRATCH" "$OUT_DIR" "$QUICK" "$TF_GPU" "$(( $(date +%s) - START ))" \
      "$BACKBONE" "$SIZE" "$BATCH" "$TASK" <<'EOF'
import json, os, sys

scratch, out_dir, quick, tf_gpu, seconds, backbone, size, batch, task = sys.argv[1:]

def last_json(name):
    try:
        lines = [l for l in open(os.path.join(scratch, name + ".out")).read().splitlines()
                 if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None

steps = {}
for line in open(os.path.join(scratch, "steps")).read().splitlines():
    name, rc, secs, limit = line.split()
    steps[name] = {"rc": int(rc), "seconds": int(secs), "timeout_s": int(limit),
                   "timed_out": int(rc) in (124, 137)}
skipped = [l for l in open(os.path.join(scratch, "skipped")).read().splitlines() if l]

smi = None
if "nvidia_smi" in steps:
    smi = [l.strip() for l in open(os.path.join(scratch, "nvidia_smi.out")) if l.strip()]
probe = last_json("tf_probe") or {}
if "install" in steps:
    ok = steps["install"]["rc"] == 0
    if not ok and "install_no_isolation" in steps:
        install = ("ok (--no-build-isolation)" if steps["install_no_isolation"]["rc"] == 0
                   else "failed (see gpu_check.log)")
    else:
        install = "ok" if ok else "failed (see gpu_check.log)"
else:
    install = "skipped"

quickstart = None
if "quickstart" in steps:
    quickstart = dict(steps["quickstart"])
    try:
        report = json.load(open(os.path.join(out_dir, "quickstart_report.json")))
        quickstart["backbone"] = report.get("backbone")
        quickstart["image_size"] = report.get("image_size")
        quickstart["tasks"] = {
            name: {stage + "_accuracy": (t.get(stage) or {}).get("accuracy")
                   for stage in ("teacher", "student", "pruned")}
            for name, t in report.get("tasks", {}).items()}
        for name, t in report.get("tasks", {}).items():
            flops = [(t.get(s) or {}).get("flops") for s in ("teacher", "pruned")]
            if all(flops):
                quickstart["tasks"][name]["pruned_flops_ratio"] = round(flops[1] / flops[0], 3)
    except (OSError, ValueError, AttributeError):
        quickstart["tasks"] = None

failed = [n for n, s in steps.items() if s["rc"] != 0
          and not (n == "install" and steps.get("install_no_isolation", {}).get("rc") == 0)]
gpu_name = smi[0].split(",")[0].strip() if smi else ((probe.get("tf_gpus") or [None])[0])
result = {
    "gpu": tf_gpu == "1",
    "gpu_name": gpu_name,
    "nvidia_smi": smi,
    "tf_version": probe.get("tf_version"),
    "keras_version": probe.get("keras_version"),
    "python": probe.get("python"),
    "tf_built_with_cuda": probe.get("tf_built_with_cuda"),
    "tf_gpus": probe.get("tf_gpus"),
    "quick": quick != "0",
    "sizes": {"backbone": backbone, "image_size": int(size), "batch_size": int(batch),
              "task": task},
    "install": install,
    "train_step": last_json("train_step"),
    "input_pipeline": last_json("input_pipeline"),
    "quickstart": quickstart,
    "steps": steps,
    "skipped": skipped,
    "failed": failed,
    "ok": not failed,
    "seconds": int(seconds),
    "out_dir": out_dir,
}
text = json.dumps(result)
with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
    f.write(text + "\n")
print(text)
sys.exit(0 if not failed else 1)
EOF
