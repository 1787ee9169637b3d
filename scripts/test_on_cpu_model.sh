#!/usr/bin/env bash
# Runs the tests on an emulated CPU: qemu-x86_64 -cpu MODEL, whose CPUID reports that model's features, so torch,
# oneDNN and ldm.accel.cpu take the paths and skips a machine of that kind takes (Haswell: AVX2, no AVX-512/AMX).
# The tests' own child processes (they start sys.executable) run on the same emulated CPU: the interpreter runs
# through a small wrapper that sys.executable names.
#
#   scripts/test_on_cpu_model.sh Haswell -q -rs tests/accel
#
# Needs qemu-user (Debian: apt-get install qemu-user) on an x86-64 Linux host; emulation is slow (tens of times
# slower than the host for the kernels), so run a few folders, not the whole suite. /proc/cpuinfo is the host's
# under qemu-user; ldm.accel.cpu drops the flags that CPUID (asked through torch) does not confirm.
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: $0 CPU_MODEL [pytest arguments] (a model of 'qemu-x86_64 -cpu help', e.g. Haswell)" >&2
    exit 2
fi
model=$1
shift
command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 is not on the PATH: apt-get install qemu-user" >&2; exit 2; }
python=${PYTHON:-python}
interpreter=$("$python" -c 'import os, sys; print(os.path.realpath(sys.executable))')
prefix=$("$python" -c 'import sys; print(sys.prefix)')

# qemu warns on every start about each feature of the model that it cannot emulate ("TCG doesn't support requested
# feature: CPUID.01H:ECX.pcid"); those warnings would land in the stderr the tests read, so turn the features off.
cpu=$model
for feature in $(qemu-x86_64 -cpu "$model" /bin/true 2>&1 | sed -n 's/.*TCG doesn.t support requested feature: [^ ]*\.\([^. ]*\) \[bit.*/\1/p'); do
    cpu="$cpu,-$feature"
done
qemu-x86_64 -cpu "$cpu" /bin/true || { echo "qemu-x86_64 does not know the CPU model '$model' (qemu-x86_64 -cpu help)" >&2; exit 2; }

# torch.compile's C++ compiler is a child the emulator does not run: with inductor's default -march=native it would
# build kernels for the host (AVX-512 on an AVX-512 host), which fault on the emulated CPU. Build for the model, in a
# cache of this run's own, so that no kernel built for the host is reused.
march=${TORCHINDUCTOR_CPP_MARCH:-${model,,}}
if ! echo | "${CXX:-g++}" -march="$march" -E -x c++ - >/dev/null 2>&1; then
    echo "the C++ compiler does not know -march=$march: set TORCHINDUCTOR_CPP_MARCH to the -march of the CPU model" \
        "'$model' (e.g. Skylake-Server: skylake-avx512, EPYC-Rome: znver2)" >&2
    exit 2
fi
folder=$(mktemp -d)
trap 'rm -rf "$folder"' EXIT
export TORCHINDUCTOR_CPP_MARCH=$march TORCHINDUCTOR_CACHE_DIR=$folder/inductor
# -0 sets the emulated interpreter's argv[0] to the wrapper itself, which Python reports as sys.executable.
cat >"$folder/python" <<EOF
#!/bin/sh
exec qemu-x86_64 -cpu '$cpu' -0 "\$0" '$interpreter' "\$@"
EOF
chmod +x "$folder/python"
seen=$("$folder/python" -c 'import sys; print(sys.prefix, sys.executable)')
if [[ $seen != "$prefix $folder/python" ]]; then
    # a virtual environment's site-packages are found from the executable's folder, which the wrapper is not in
    echo "under emulation the interpreter reports '$seen', not '$prefix $folder/python': use a Python outside a" \
        "virtual environment (PYTHON=/path/to/python)" >&2
    exit 2
fi
echo "qemu-x86_64 -cpu $cpu (C++ kernels for -march=$march): torch CPU capability" \
    "$("$folder/python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')" >&2
status=0
"$folder/python" -m pytest "$@" || status=$?
exit $status
