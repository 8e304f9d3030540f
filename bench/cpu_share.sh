#!/usr/bin/env bash
# Run a command and report how the machine's CPU time was spent meanwhile, from
# /proc/stat: user, system, idle and *steal* (time the hypervisor gave to other guests).
# On a shared VM a benchmark taken while steal is high is slower than the code is;
# docs/benchmarks*.md quote this line next to every timing taken this way.
#
#   bench/cpu_share.sh target/release/saelab eval --sae DIR --evals core
set -euo pipefail
read_stat() { head -1 /proc/stat | awk '{print $2+$3, $4+$7+$8, $5+$6, $9}'; }
read -r u0 s0 i0 st0 < <(read_stat)
t0=$(date +%s.%N)
status=0
"$@" || status=$?
t1=$(date +%s.%N)
read -r u1 s1 i1 st1 < <(read_stat)
awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v i=$((i1 - i0)) -v st=$((st1 - st0)) \
    -v w="$(echo "$t1 - $t0" | bc)" 'BEGIN {
  t = u + s + i + st; if (t == 0) t = 1;
  printf "cpu_share: wall %.1f s; all cores: user %.0f%%, system %.0f%%, idle %.0f%%, steal %.0f%%\n",
         w, 100*u/t, 100*s/t, 100*i/t, 100*st/t > "/dev/stderr" }'
exit $status
