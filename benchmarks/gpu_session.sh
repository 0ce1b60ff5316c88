#!/usr/bin/env bash
# The GPU half of the kernel benchmark, as one command for a lent GPU machine (the `device` tool).
# Those machines hold torch, triton and transformers but no optuna and no network, so mpq goes in
# without its dependencies, and the demo is compiled beforehand on any machine with mpq:
#     mpq compile demo --max-mem 8MB -o .gpu/demo-out -q       # .gpu/ is git-ignored; carry it
# then on the GPU, one call for everything (both formats, every shape and M, then the demo's configs,
# then benchmarks/row_reads.py, benchmarks/scaled_decode.py, benchmarks/experts_decode.py and benchmarks/gpu_decode_space.py;
# arguments after the folder go to benchmarks/gpu_kernels.py, e.g. --formats int8 for a rerun of one):
#     bash benchmarks/gpu_session.sh .gpu/demo-out
# A shape's first call compiles its launch candidates in threads, one per core, before timing them.
# The JSON is rewritten after every row, so a run stopped at its time limit still brings its rows back.
# Results go to $OUT (which the device tool brings back), else benchmarks/results.
set -euo pipefail
cd "$(dirname "$0")/.."
configs=${1:?usage: bash benchmarks/gpu_session.sh DEMO_COMPILE_OUT [benchmarks/gpu_kernels.py options]}
shift
if ! python3 -m pip install --no-deps --no-build-isolation --quiet -e .; then
  # No build tools that fit: import mpq from a folder that lays the package out as pyproject maps it.
  overlay=$(mktemp -d)
  mkdir "$overlay/mpq"
  ln -s "$PWD"/mpq/* "$overlay/mpq/"
  ln -s "$PWD/kernels" "$overlay/mpq/kernels"
  ln -s "$PWD/search" "$overlay/mpq/search"
  export PYTHONPATH="$overlay${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_session.sh: pip could not install mpq; importing it from $overlay"
fi
python3 -P -c "import mpq.kernels; print('mpq from', mpq.__file__)"  # -P: not the source tree in the working directory
echo "cores: $(nproc)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo "(no nvidia-smi)"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
# Each stage may be given seconds of its own (a lease is short; the JSON of a stage cut off keeps its
# rows), and each runs even if one before it failed: MPQ_GPU_KERNELS_S, MPQ_GPU_ROWS_S, MPQ_GPU_SCALED_S,
# MPQ_GPU_EXPERTS_S, MPQ_GPU_SPACE_S (0: no limit).
status=0
timeout "${MPQ_GPU_KERNELS_S:-0}" python3 benchmarks/gpu_kernels.py --configs "$configs" --out "${OUT:-benchmarks/results}" "$@" \
  || { status=$?; echo "gpu_session.sh: gpu_kernels.py exited $status"; }
# then the layers' packed rows read in the pieces the decode tiles read them, without arithmetic
timeout "${MPQ_GPU_ROWS_S:-0}" python3 benchmarks/row_reads.py --out "${OUT:-benchmarks/results}" \
  || { status=$?; echo "gpu_session.sh: row_reads.py exited $status"; }
# then decoding of Llama-3-8B-shaped blocks, bf16 against INT4 and INT8: whether the kernels speed up a model
timeout "${MPQ_GPU_SCALED_S:-0}" python3 benchmarks/scaled_decode.py --out "${OUT:-benchmarks/results}" \
  || { status=$?; echo "gpu_session.sh: scaled_decode.py exited $status"; }
# then a mixture of experts at decode: grouped expert launches against the per-expert loop
timeout "${MPQ_GPU_EXPERTS_S:-0}" python3 benchmarks/experts_decode.py --out "${OUT:-benchmarks/results}" \
  || { status=$?; echo "gpu_session.sh: experts_decode.py exited $status"; }
# then the decode launch space crossed with warps and stages, for what the tuner's space should hold
timeout "${MPQ_GPU_SPACE_S:-0}" python3 benchmarks/gpu_decode_space.py --out "${OUT:-benchmarks/results}" \
  || { status=$?; echo "gpu_session.sh: gpu_decode_space.py exited $status"; }
exit $status
