#!/usr/bin/env bash
# Fetch (here, where pip reaches the registry) the cp312 wheels the GPU device image lacks into
# .whl/ (git-ignored through .git/info/exclude), which gpu_quick.sh / gpu_check.sh install there:
#   bash bench/device_wheels.sh      then   run(command="bash bench/gpu_quick.sh", carry=[".whl"])
# Versions pinned to what our CI installs; one version of each (two stop the install there).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
plat=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plat="$plat --platform $p"
done
fetch() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl "$@"
}
fetch soundfile==0.14.0 || fetch soundfile          # pure Python + its own libsndfile
fetch soxr==1.1.0 || fetch soxr
fetch cffi==2.0.0 pycparser==3.0 nvtx==0.2.17
ls -l .whl
du -sh .whl
