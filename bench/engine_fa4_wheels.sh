# FlashAttention 4 (CuTe DSL) and CUTLASS's Python DSL for bench/engine_vision_fa4_probe.py on the GPU machine,
# packed in two parts because one call carries at most 64 MiB and the DSL's compiler library alone is 193 MB
# (50 MB xz-compressed): .fa4a/ holds that library, .fa4b/ the rest (FA4 4.0.0b36, nvidia-cutlass-dsl 4.8.1 with
# its base, core and CUDA 13 libraries, quack-kernels 0.6.5, apache-tvm-ffi 0.1.15.post2, torch-c-dlpack-ext
# 0.1.5; einops, cuda-bindings and protobuf are already there). Carry .fa4a in one call, which unpacks it into
# .fa4keep/ and /tmp/fa4keep/ (kept on a warm machine), then .fa4b in the next (within the machine's 30 s idle release):
#   call 1: mkdir -p .fa4keep /tmp/fa4keep && cp .fa4a/* .fa4keep/ && cp .fa4a/* /tmp/fa4keep/
#   call 2: bash bench/engine_fa4_wheels.sh unpack /tmp/fa4site && export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
# Both folders are ignored (.git/info/exclude). Packing takes ~6 minutes on the 2-core dev box (xz -9).
set -eu
if [ "${1:-}" = unpack ]; then
  site=$2
  mkdir -p "$site"
  tar -C "$site" -xJf .fa4b/rest.tar.xz
  part=.fa4keep/ir.so.xz
  [ -f "$part" ] || part=/tmp/fa4keep/ir.so.xz
  xz -dc "$part" > "$site/nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so"
  exit 0
fi
work=$(mktemp -d)
plat="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: $plat -d "$work/w" \
  flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
  apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
for f in "$work"/w/*.whl; do python3 -m zipfile -e "$f" "$work/site"; done
lib=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
mkdir -p .fa4a .fa4b
xz -T2 -9 -c "$work/site/$lib" > .fa4a/ir.so.xz
tar -C "$work/site" --exclude="$lib" -cf - . | xz -T2 -9 > .fa4b/rest.tar.xz
rm -rf "$work"
ls -la .fa4a .fa4b
