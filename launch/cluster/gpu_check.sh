#!/usr/bin/env bash
# The GPU check as one command on a CUDA machine that reaches no package registry:
#
#   bash launch/cluster/gpu_check.sh [OUT_DIR] [hyena-glt bench gpu options...]
#
# installs the wheels that `make gpu-wheels` put in gpu_wheels/ (carried along with the
# checkout), installs this checkout without dependencies, and runs `hyena-glt bench gpu`;
# OUT_DIR defaults to $OUT, else runs/gpu-check. It uses the machine's own python3 and torch.
#
#   bash launch/cluster/gpu_check.sh wheels
#
# (what `make gpu-wheels` runs, on a machine with PyPI) downloads them: cp312 manylinux x86-64
# wheels of what that machine lacks, at the versions this project pins and tests.
set -euo pipefail
cd "$(dirname "$0")/../.."

WHEELS=gpu_wheels
# What the machine lacks, installed by name; then their dependencies that it lacks or may hold
# too old (typing-extensions, packaging): pip takes one of those only when needed, so the
# machine's own newer copies stay.
PACKAGES=(megatron-core==0.16.1 webdataset==1.0.2 pyfastx==2.3.1 pydantic==2.14.4)
DEPENDENCIES=(braceexpand==0.1.7 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
              typing-extensions==4.16.0 packaging==26.4)
# ZeRO runs only: DeepSpeed ships as an sdist (built there with DS_BUILD_OPS=0; the check itself
# trains with zero.stage=0 and does not need it).
DEEPSPEED=(deepspeed==0.19.8 hjson==3.1.0)
PY="${PYTHON:-python3}"

if [ "${1:-}" = wheels ]; then
    mkdir -p "$WHEELS"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" "${PACKAGES[@]}" "${DEPENDENCIES[@]}" "${DEEPSPEED[1]}"
    "$PY" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$WHEELS" "${DEEPSPEED[0]}"
    ls -l "$WHEELS"
    # They travel with the working tree, which may be 64 MiB in all.
    mib=$(du -sm "$WHEELS" | cut -f1)
    echo "gpu_check.sh: $WHEELS/ holds ${mib} MiB"
    if [ "$mib" -ge 60 ]; then
        echo "gpu_check.sh: $WHEELS/ is over 60 MiB: remove stale versions from it" >&2
        exit 1
    fi
    exit 0
fi

out="${OUT:-runs/gpu-check}"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # a first argument that is not an option: the output dir
    out="$1"
    shift
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -d "$WHEELS" ]; then
    echo "gpu_check.sh: no $WHEELS/ here: run 'make gpu-wheels' where PyPI is reachable and carry $WHEELS/ along" >&2
    exit 2
fi
"$PY" -m pip install -q --no-index --find-links "$WHEELS" "${PACKAGES[@]}"
# No build isolation: the machine's setuptools builds the editable install, nothing is fetched.
"$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e . ||
    echo "gpu_check.sh: warning: 'pip install -e .' failed; running from the checkout (python -m launch.cli)" >&2
if [ "${GPU_CHECK_DEEPSPEED:-0}" = 1 ]; then
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-build-isolation "${DEEPSPEED[@]}"
fi
"$PY" -c 'import torch; print(f"gpu_check.sh: torch {torch.__version__}, CUDA {torch.cuda.is_available()}", flush=True)'
set -o pipefail
"$PY" -m launch.cli bench gpu --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
