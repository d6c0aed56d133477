# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Both set up what they need first (tools/setup_env.sh), and are safe to run again.
PYTEST_ARGS ?=

.PHONY: demo test test-cuda bench setup clean

setup:
	@tools/setup_env.sh >/dev/null

demo:
	@PY=$$(tools/setup_env.sh) && $$PY -m blt_ext demo

test:
	@PY=$$(tools/setup_env.sh) && $$PY -m pytest tests $(PYTEST_ARGS)

bench:
	@PY=$$(tools/setup_env.sh) && $$PY benchmarks/run.py

clean:
	rm -rf build blt_ext/_C*.so blt_ext/_build_info.py
