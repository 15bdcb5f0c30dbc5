# Sourced by the launch scripts: sets LONGTRAIN to the command that runs longtrain's CLI under the Python that has
# longtrain and JAX installed, so a script started outside the virtual environment still runs the right one:
# $LONGTRAIN_PYTHON -m longtrain if set, else the `longtrain` command on PATH (its shebang names that Python), else
# python3 -m longtrain. Exits 2 with a message when none of them can import longtrain and jax.
if [ -n "${LONGTRAIN_PYTHON:-}" ]; then
  LONGTRAIN=("$LONGTRAIN_PYTHON" -m longtrain)
  _probe=("$LONGTRAIN_PYTHON" -c "import jax, longtrain.cli")
elif command -v longtrain >/dev/null 2>&1; then
  LONGTRAIN=(longtrain)
  _probe=(longtrain --version)
else
  LONGTRAIN=(python3 -m longtrain)
  _probe=(python3 -c "import jax, longtrain.cli")
fi
if ! "${_probe[@]}" >/dev/null 2>&1; then
  echo "launch: '${LONGTRAIN[*]}' cannot run longtrain (is the environment where you ran 'pip install -e .'" \
       "active?); activate it, or set LONGTRAIN_PYTHON=/path/to/that/python" >&2
  exit 2
fi
unset _probe
