# The two commands of README.md: `make demo` and `make test`.
.PHONY: setup demo test test-fast bench lint deb wheel

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

# Three workers, each taking whole modules (a module's VMs and clusters are set up once).
# Three on two cores: with two, a quarter of the cores' time went unused while tests wait
# (a Ceph eviction, guest boots, timeouts). TEST_JOBS=1 runs the suite in one process.
TEST_JOBS ?= 3
test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist loadfile --durations=25

# The inner loop (after one `make setup`): all but QEMU guests, cluster file systems and
# the long runs (fuzzing, rig runs, stress, outages). `make test` runs everything.
test-fast:
	.venv/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) --dist loadfile -m "not vm and not ceph and not gluster and not slow"

lint:
	.venv/bin/ruff check .

# Every comparison in one run: bench-out/bench.md, bench.png, bench.json (BENCH_ARGS=--quick ...).
bench: setup
	.venv/bin/python scripts/bench $(BENCH_ARGS)

# A Debian package for a host admin: dist/vfs-lockd_VERSION_ARCH.deb (debian/, README
# "Install as a package"); scripts/package-test installs it in fresh Debian 12/13 roots.
deb:
	bash packaging/build-deb

# A wheel for those who manage Python themselves: pip builds the cffi module into it.
wheel: setup
	.venv/bin/python -m pip wheel --no-deps -w dist .
