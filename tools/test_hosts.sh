#!/usr/bin/env bash
# Run the host test suite (tests/host) against several ComfyUI installs, one after the other, each with its own
# Python, and print one summary line per host. It only runs what is there: it fetches and installs nothing.
#
#   tools/test_hosts.sh COMFYUI_DIR[:PYTHON] ... [-- PYTEST_ARGS ...]
#
# PYTHON defaults to COMFYUI_DIR/venv/bin/python, then COMFYUI_DIR/.venv/bin/python. PYTEST_ARGS default to
# tests/host; give files or -k to run a part. CHROMIUM (for the browser tests) passes through. Example:
#
#   tools/test_hosts.sh /opt/comfy/c064:/opt/comfy/venv064/bin/python /opt/comfy/c033:/opt/comfy/venv033/bin/python
#
# Exit status: 0 if every host passed, else 1 (2: bad arguments).
set -u

usage() {
  sed -n '2,12s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

hosts=()
while (($#)) && [[ $1 != -- ]]; do
  hosts+=("$1")
  shift
done
[[ ${1:-} == -- ]] && shift
pytest_args=("$@")
((${#pytest_args[@]})) || pytest_args=(tests/host)
((${#hosts[@]})) || usage

repo=$(cd "$(dirname "$0")/.." && pwd)
summary=()
status=0
for host in "${hosts[@]}"; do
  dir=${host%%:*}
  python=${host#"$dir"}
  python=${python#:}
  if [[ -z $python ]]; then
    for candidate in "$dir/venv/bin/python" "$dir/.venv/bin/python"; do
      [[ -x $candidate ]] && python=$candidate && break
    done
  fi
  if [[ ! -f $dir/main.py || ! -d $dir/comfy ]]; then
    echo "$dir is not a ComfyUI folder (no main.py and comfy/)" >&2
    exit 2
  fi
  if [[ -z $python || ! -x $python ]]; then
    echo "no Python for $dir: give it as $dir:/path/to/python" >&2
    exit 2
  fi
  version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$dir/comfyui_version.py" 2>/dev/null)
  label="ComfyUI ${version:-?} at $dir ($python)"
  echo "=== $label"
  (cd "$repo" && COMFYUI_PATH=$dir "$python" -m pytest -p no:cacheprovider "${pytest_args[@]}")
  code=$?
  if ((code == 0)); then
    summary+=("passed  $label")
  else
    summary+=("FAILED  $label (pytest exit $code)")
    status=1
  fi
done

echo "=== summary"
printf '%s\n' "${summary[@]}"
exit $status
