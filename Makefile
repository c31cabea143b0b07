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

bench: setup
	.venv/bin/python scripts/bench_core.py
