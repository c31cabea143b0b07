# The two commands of README.md: `make demo` and `make test`.
.PHONY: setup demo test bench lint

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider

lint:
	.venv/bin/ruff check .

# Every comparison in one run: bench-out/bench.md, bench.png, bench.json (BENCH_ARGS=--quick ...).
bench: setup
	.venv/bin/python scripts/bench $(BENCH_ARGS)
