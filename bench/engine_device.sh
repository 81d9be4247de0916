# Issue 10's acceptance benchmark on the GPU machine: run's command `GIT_REV=<commit> bash bench/engine_device.sh`,
# carry [".whl"] (made here by `bash bench/engine_wheels.sh`), timeout_s 600. About 9.5 minutes: installing the
# wheels ~10 s, then bench/engine_bench.py's own budget of 540 s (it stops and writes on time): the continuous
# engine, the hf engine and the one-request-at-a-time design at 1 / 8 / 32 / 64 clients, bare generate first.
# $OUT gets engine_bench.{json,md,log}, server_logs.txt, gpu_samples.csv and stdout.txt; output_tail ends with
# the acceptance lines. BUDGET_S overrides the 540 s (a budget too small for the designs stops at once).
# With FlashAttention 4 in the tower (the `flash4` extra; +8-11 % at 32 clients on an H200, Session 12), as
# runs 38-57 were measured: first a call carrying [".fa4a"] that runs
#   mkdir -p /tmp/fa4keep && cp .fa4a/* /tmp/fa4keep/
# then, within the machine's 30 s idle release, this script carrying [".whl", ".fa4b"]: it finds both parts and
# unpacks them (bench/engine_fa4_wheels.sh).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 GIT_REV=${GIT_REV:-unknown}
if [ -f .fa4b/rest.tar.xz ] && { [ -f .fa4keep/ir.so.xz ] || [ -f /tmp/fa4keep/ir.so.xz ]; }; then
  bash bench/engine_fa4_wheels.sh unpack /tmp/fa4site || exit 1
  export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
  python3 -c "from flash_attn.cute import flash_attn_func" && echo "FlashAttention 4: unpacked, imports" || exit 1
else
  echo "FlashAttention 4: not carried (the tower's attention will be cuDNN's)"
fi
nvidia-smi -L
python3 bench/engine_bench.py --budget-s "${BUDGET_S:-540}" --designs continuous,hf,seed --out "$OUT" > "$OUT/stdout.txt" 2>&1
rc=$?
tail -n 40 "$OUT/engine_bench.log" 2>/dev/null || tail -n 5 "$OUT/stdout.txt"
exit $rc
