#!/usr/bin/env bash
# A GPU session in one call of the project's GPU machine (the `device` tool: a bare machine with
# its own Python 3.12, torch and CUDA, no internet): the test suite on CUDA, then benchmark
# commands for the time left, the new records back as one archive.
#
#   bash benchmarks/gpu_session.sh wheels     # here, once: .whl/core and .whl/flower (git-ignored)
#   bash benchmarks/gpu_session.sh run [--tests|--no-tests] [--budget S] [COMMAND ...]
#                                             # there, from the repository root
#
# `wheels` downloads (Python 3.12, manylinux) what the machine's image lacks, at the versions
# installed here: .whl/core (RecBole and what it imports, hyperopt, pytest-xdist) and
# .whl/flower (Flower and its server stack). The tree travels with its tracked files (about
# 32 MB), so carry .whl/core always, .whl/flower for the tests, and the benchmark data a
# command needs (converted data under benchmarks/data, item-text caches under benchmarks/saved:
# the machine has no ../shared/data and no MiniLM; the text tests skip there), within 64 MiB.
#
# `run` installs the carried wheels into /tmp/site; with --tests (the default when no COMMAND is
# given) it runs the whole suite on CUDA (pytest -n 8; RecBole trains on the GPU; tests/tests.log
# and tests.xml go to $OUT); then it runs each COMMAND (e.g. "python benchmarks/cross_market.py
# --dataset movielens-catalogues --models Local --seeds 2020") side by side in benchmarks/, each
# with one torch thread, until --budget seconds (default 480) have passed since the start, and
# packs every file they added under benchmarks/results into $OUT/results.tgz. Records of runs
# that ended are complete (a run killed at the budget writes none); unpack them here with
# `tar -xzf <files_at>/results.tgz` and commit them. Each record names the GPU it ran on.
#
# Example call of the device tool (carry: [".whl/core", ".whl/flower"], timeout_s 600):
#   bash benchmarks/gpu_session.sh run --tests --budget 520
set -uo pipefail
cd "$(dirname "$0")/.."

CORE="recbole colorlog texttable thop hyperopt future pytest-xdist execnet"
FLOWER="flwr alembic annotated-types cffi cryptography fastapi greenlet grpcio-health-checking \
iterators mako prompt-toolkit pycparser pycryptodome pydantic pydantic-core sqlalchemy starlette \
tomli tomli-w typing-inspection uvicorn wcwidth protobuf"

wheels() {
    local group dir pkg version
    grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    for group in core flower; do
        dir=".whl/$group"
        rm -rf "$dir" && mkdir -p "$dir"
        local names=$CORE
        [ "$group" = flower ] && names=$FLOWER
        for pkg in $names; do
            version=$(python -m pip show "$pkg" 2>/dev/null | awk '/^Version:/{print $2}')
            [ -n "$version" ] || { echo "gpu_session: $pkg is not installed here (pip install '.[test,flower]')" >&2; return 2; }
            python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
                --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
                --platform manylinux2014_x86_64 --platform any -d "$dir" "$pkg==$version" || return 2
        done
        echo "$dir: $(du -sh "$dir" | cut -f1)"
    done
}

run() {
    local tests="" budget=480 commands=() started log i left
    while [ $# -gt 0 ]; do
        case $1 in
            --tests) tests=1 ;;
            --no-tests) tests=0 ;;
            --budget) budget=$2; shift ;;
            *) commands+=("$1") ;;
        esac
        shift
    done
    [ -n "$tests" ] || { [ ${#commands[@]} -eq 0 ] && tests=1 || tests=0; }
    started=$(date +%s)
    OUT=${OUT:-/tmp/gpu_session_out}
    mkdir -p "$OUT"
    ls -d .whl/*/ >/dev/null 2>&1 || { echo "gpu_session: no .whl/<group> carried (run 'wheels' here first)" >&2; return 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*/*.whl || return 2
    # recbole_cmr itself, as CI installs it (entry points, console scripts); the image has setuptools
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
        --target /tmp/site . || return 2
    export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1 \
        HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1
    python3 -c "import torch, recbole; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '-', 'recbole', recbole.__version__)"
    touch /tmp/gpu_session.start
    if [ "$tests" = 1 ]; then
        left=$((budget - ($(date +%s) - started)))
        timeout "$left" python3 -m pytest tests -p no:cacheprovider -n 8 -rfEs \
            --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
        echo "tests: exit $? ($(tail -n 1 "$OUT/tests.log"))"
    fi
    i=0
    for command in "${commands[@]}"; do
        i=$((i + 1))
        left=$((budget - ($(date +%s) - started)))
        log="$OUT/bench-$i.log"
        echo "bench-$i: $command"
        (cd benchmarks && timeout "$left" bash -c "$command" > "$log" 2>&1; echo "bench-$i: exit $?") &
    done
    wait
    find benchmarks/results -newer /tmp/gpu_session.start -type f -print0 \
        | tar --null -czf "$OUT/results.tgz" -T -
    echo "results.tgz: $(tar -tzf "$OUT/results.tgz" | wc -l) files"
}

case ${1:-} in
    wheels) shift; wheels "$@" ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash benchmarks/gpu_session.sh wheels | run [--tests|--no-tests] [--budget S] [COMMAND ...]" >&2
       exit 2 ;;
esac
