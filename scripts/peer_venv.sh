#!/usr/bin/env bash
# Make a peer's own virtual environment (for `make bench-peers`), e.g.
#   scripts/peer_venv.sh .peers/trl-1.16.0 trl==1.16.0 /work/main/.venv
# The peer must run on exactly our torch and transformers, so the venv installs nothing but the peer itself
# (--no-deps): a .pth file puts the base venv's site-packages (torch, transformers, accelerate, datasets, ...)
# behind the venv's own. The peer's declared requirements are then checked to be met, not installed.
set -euo pipefail
dest=$1 spec=$2 base=${3:-.venv}
base_py=$(readlink -f "$base/bin/python")
base_site=$("$base/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ ! -x "$dest/bin/python" ]; then
	"$base_py" -m venv "$dest"
fi
dest_site=$("$dest/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$base_site" > "$dest_site/peer_base_site_packages.pth"
name=${spec%%=*}
have=$("$dest/bin/python" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
if [ "$have" != "${spec##*==}" ]; then
	"$dest/bin/python" -m pip install -q --no-deps "$spec"
fi
# Fail loudly if a requirement of the peer is missing, or if torch is not the base's.
"$dest/bin/python" - "$name" "$base_site" <<'PY'
import importlib.metadata as md, sys
from packaging.requirements import Requirement
name, base_site = sys.argv[1], sys.argv[2]
missing = []
for text in md.requires(name) or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(f"{req} (absent)")
        continue
    if not req.specifier.contains(have, prereleases=True):
        missing.append(f"{req} (have {have})")
if missing:
    sys.exit(f"{name}: requirements not met by the base venv: {', '.join(missing)}")
import torch, transformers
if not torch.__file__.startswith(base_site):
    sys.exit(f"torch: expected the base venv's ({base_site}), got {torch.__file__}")
print(f"{name} {md.version(name)} ready: torch {torch.__version__}, transformers {transformers.__version__}")
PY
