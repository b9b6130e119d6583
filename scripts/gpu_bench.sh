#!/bin/bash
# The H100 run of README.md (Speed) (device tool): kernels check (outlier split included) + GB/s
# table (plain codec and the default codec's K / V specs), restore check, the decode-kernel
# sweep (checked plain kernel vs the plan kernel's variants), 8B-shaped speed bench with the
# fused kernels and with the reference (8K). Expects MLX-CUDA unpacked in /tmp/site and writes
# under $OUT. One device call may not fit it all (600 s): KB_ARGS / SKIP_SPEED split it.
set -u
export PYTHONUNBUFFERED=1
rm -rf /tmp/pv && mkdir -p /tmp/pv && cp -r promptvault /tmp/pv/ && cp -r migrations /tmp/pv/promptvault/migrations
export PYTHONPATH=/tmp/site:/tmp/pv
cd /tmp
S() { python3 -c 'from promptvault.cli import main; main()' bench speed --model random:llama3-8b --workdir /tmp "$@"; }
nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm,clocks.mem --format=csv > $OUT/gpu.txt
timeout ${T_KB:-300} python3 -c 'from promptvault.cli import main; main()' bench kernels ${KB_ARGS:---check --bench --restore --sweep} --out $OUT/kb.json > $OUT/kb.log 2>&1
grep -E "check:|FAIL|copy|^\|" $OUT/kb.log | head -40
[ -n "${SKIP_SPEED:-}" ] && exit 0
S --lengths ${LENS:-4096,8192,16384,32768} --json > $OUT/speed-fused.json 2> $OUT/speed-fused.err &
wait $!; tail -3 $OUT/speed-fused.err
PROMPTVAULT_FUSED=0 S --lengths 8192 --json > $OUT/speed-ref.json 2> $OUT/speed-ref.err
tail -3 $OUT/speed-ref.err
python3 - <<'PY'
import json, os
from promptvault.bench.speed import format_table
for n in ("speed-fused", "speed-ref"):
    try:
        print(format_table(json.load(open(os.environ["OUT"] + f"/{n}.json"))))
    except Exception as e:
        print(n, "no result:", e)
PY
