# Issue 10's GPU benchmark in ONE device call: run's command `GIT_REV=<commit> bash bench/engine_device.sh`,
# carry [".whl"] (made here by `bash bench/engine_wheels.sh`), timeout_s 600. About 9.3 minutes: installing the
# wheels ~10 s, then bench/engine_bench.py's own budget of 540 s (it stops and writes on time). $OUT gets
# engine_bench.{json,md,log}, server_logs.txt, gpu_samples.csv and stdout.txt; output_tail ends with a short table.
# The same as one line (to paste as the command instead):
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 GIT_REV=${GIT_REV:-unknown} || exit 1; nvidia-smi -L; python3 bench/engine_bench.py --budget-s 540 --out $OUT > $OUT/stdout.txt 2>&1; tail -n 50 $OUT/engine_bench.log
