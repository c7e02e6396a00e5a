#!/usr/bin/env bash
# Try the suite against other versions of the runtime dependencies, the way .ci/run's lowest-versions
# run does, to move a floor:   bash .ci/try_versions.sh 'numpy==1.23.5' ['rich==12.0.1' ...]
# Fresh venv with those pins (the rest at .ci/lowest.txt unless given), the test tools without the
# reference libraries, ATTNTRACE_FLOOR_RUN=1 (only skips about a missing reference are allowed).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { sed -n 2,5p "$0"; exit 2; }
VENV=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$VENV")"' EXIT
"${ATTNTRACE_CI_PYTHON:-python3.11}" -m venv "$VENV"
pins=$(dirname "$VENV")/pins.txt
printf '%s\n' "$@" > "$pins"
grep -v '^#' .ci/lowest.txt | while read -r line; do
    grep -qi "^${line%%==*}==" "$pins" || echo "$line" >> "$pins"
done
echo "trying: $(tr '\n' ' ' < "$pins")"
# the project without its declared bounds, which a version below a floor would contradict
"$VENV/bin/python" -m pip install -q -c "$pins" click numpy rich pyyaml pytest hypothesis jsonschema import-linter
"$VENV/bin/python" -m pip install -q --no-deps .
env -u CI ATTNTRACE_FLOOR_RUN=1 "$VENV/bin/python" -m pytest -rfEs -p no:cacheprovider
