#!/bin/sh
# Runs every test script (t-*.sh) and exits non-zero if any failed.
cd "$(dirname "$0")" || exit 1
failed=""
for t in t-api-edge.sh t-io-twins.sh t-img-map.sh t-img-check.sh t-img-create.sh t-bad-input.sh \
    t-bench.sh t-stats.sh t-demo.sh t-valgrind.sh t-nbdkit.sh t-install.sh t-guest.sh; do
    echo "==== $t"
    sh "./$t" || failed="$failed $t"
done
echo "===="
if [ -n "$failed" ]; then
    echo "FAILED:$failed"
    exit 1
fi
echo "all tests passed"
