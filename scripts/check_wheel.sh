#!/usr/bin/env bash
# Check that a built wheel works on its own: build it from the files git knows, install it into a fresh venv
# outside the repository, and from a folder outside the repository run `dragon-peer --help` and a 2-step
# `--new-swarm` run. Configs, profiles and the tokenizer must come from the installed package, not this checkout.
#
# Dependencies: by default the fresh venv sees the project's .venv site-packages through a .pth file (fast,
# offline; dragon_swarm itself still comes only from the wheel, since .pth files of that folder, such as the
# editable install's finder, are not run). CHECK_WHEEL_FULL=1 installs the wheel with all its dependencies
# instead (torch pinned as scripts/setup.sh does; DRAGON_TORCH_SPEC overrides). The corpus is read from
# $DRAGON_DATA_DIR, by default this checkout's data/ (fetched by scripts/setup.sh).
# Usage: bash scripts/check_wheel.sh   (after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY="$REPO/.venv/bin/python"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dragon-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
step() { echo "check_wheel: $*"; }

step "copying the source (git-tracked and untracked, not ignored files)"
"$PY" - "$WORK/src" <<'EOF'
import os, shutil, subprocess, sys
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, check=True).stdout.decode().split("\0")
for name in filter(os.path.isfile, listed):  # deleted-but-tracked files are skipped
    target = os.path.join(sys.argv[1], name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(name, target)
EOF

step "building the wheel"
"$PY" -m pip wheel --quiet --no-deps "$WORK/src" -w "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/dragon_swarm-*.whl)
"$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
needed = ["dragon_swarm/configs/dragon-tiny.yaml", "dragon_swarm/profiles/cpu-laptop.yaml",
          "dragon_swarm/data/assets/dragon-bpe-8k.json", "dragon_swarm/monitor/static/dashboard.html"]
missing = [n for n in needed if n not in names]
sys.exit(f"check_wheel: the wheel lacks {missing}" if missing else 0)
EOF

step "installing $(basename "$WHEEL") into a fresh venv"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
if [ "${CHECK_WHEEL_FULL:-0}" = "1" ]; then
  "$VPY" -m pip install --quiet "${DRAGON_TORCH_SPEC:-torch==2.13.0}" "$WHEEL"
else
  "$VPY" -m pip install --quiet --no-deps "$WHEEL"
  DEPS=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$DEPS" > "$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/project-venv-deps.pth"
fi

mkdir "$WORK/run"
cd "$WORK/run"  # outside the repository: nothing may be found through the current directory
export DRAGON_DATA_DIR="${DRAGON_DATA_DIR:-$REPO/data}"
step "where the installed package finds its files"
"$VPY" - "$WORK/venv" <<'EOF'
import sys
import dragon_swarm
from dragon_swarm import paths
venv = sys.argv[1]
found = {"package": dragon_swarm.__file__, "configs": paths.config_dir(), "profiles": paths.profile_dir(),
         "tokenizer": paths.tokenizer_dir()}
outside = {k: str(v) for k, v in found.items() if not str(v).startswith(venv)}
if outside or paths.source_root() is not None:
    sys.exit(f"check_wheel: not from the installed wheel: {outside}, source root {paths.source_root()}")
print("  configs:", ", ".join(paths.shipped_names(paths.config_dir())), "| profiles:", ", ".join(paths.shipped_names(paths.profile_dir())))
EOF

step "dragon-peer --help"
"$WORK/venv/bin/dragon-peer" --help > "$WORK/help.txt"
grep -q -- "--new-swarm" "$WORK/help.txt"

step "dragon-peer --new-swarm --max-steps 2 (data: $DRAGON_DATA_DIR)"
timeout 600 "$WORK/venv/bin/dragon-peer" --new-swarm --max-steps 2 --no-panel --state-dir "$WORK/state" \
  --stats-file "$WORK/stats.jsonl" > "$WORK/peer.out" 2> "$WORK/peer.err" || {
  tail -n 40 "$WORK/peer.err"; echo "check_wheel: the 2-step run failed"; exit 1; }
grep -q "To join this swarm" "$WORK/peer.out" || { tail -n 40 "$WORK/peer.err"; echo "check_wheel: no join line"; exit 1; }
[ -f "$WORK/state/trainer.safetensors" ] || { tail -n 40 "$WORK/peer.err"; echo "check_wheel: no trainer checkpoint"; exit 1; }
step "ok: $(wc -l < "$WORK/stats.jsonl") stats record(s), checkpoint saved"
