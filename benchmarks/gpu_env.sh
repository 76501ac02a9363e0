# Sourced (bash) by the GPU scripts, from any directory: cd to the checkout, put what the GPU image lacks of the
# test extras (the wheels of .whl, git-ignored, carried to the GPU machine) and this checkout on PYTHONPATH.
# Installs nothing from the network. .whl is fetched here by
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl depyf astor dill pyflakes
cd "$(dirname "${BASH_SOURCE[0]}")/.." || return
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# the entry points (fp4c, backend="fp4") need the package installed; the checkout on PYTHONPATH in any case
if ! python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . >/tmp/pip_install.log 2>&1; then
  echo "editable install failed (see below); using PYTHONPATH=$PWD"; tail -3 /tmp/pip_install.log
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
