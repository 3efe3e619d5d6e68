# Thin wrapper over CMake. `make demo` and `make test` do all set-up on a fresh Debian 12 machine.
BUILD      ?= build
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
FUZZ_BUILD ?= build-fuzz
DEMO_ADDR  ?= 127.0.0.1:8080
FUZZ_SECONDS ?= 30
FUZZ_TARGETS = $(patsubst tests/fuzz/fuzz_%.c,%,$(wildcard tests/fuzz/fuzz_*.c))
JOBS       ?= $(shell nproc)
PYTHON     ?= /usr/bin/python3
CMAKE_FLAGS ?=

.PHONY: all build deps demo demo-stop test test-unit test-integration test-python test-asan test-tsan \
        soak soak-asan soak-valgrind fuzz bench clean

all: build

deps:
	@.ci/install-deps.sh build

build: deps
	@cmake -S . -B $(BUILD) $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(BUILD) -j$(JOBS)

# Starts pushletd in the background on $(DEMO_ADDR) with its demo page; `make demo-stop` ends it.
demo: build
	@$(MAKE) --no-print-directory demo-stop >/dev/null
	@nohup $(BUILD)/bin/pushletd --listen $(DEMO_ADDR) >$(BUILD)/pushletd.log 2>&1 & \
	  echo $$! > $(BUILD)/pushletd.pid
	@for i in $$(seq 50); do \
	  curl -fs http://$(DEMO_ADDR)/healthz >/dev/null 2>&1 && break; sleep 0.1; done
	@curl -fs http://$(DEMO_ADDR)/healthz >/dev/null || \
	  { cat $(BUILD)/pushletd.log; echo "pushletd did not start"; exit 1; }
	@echo "pushletd is running (pid $$(cat $(BUILD)/pushletd.pid), log $(BUILD)/pushletd.log)"
	@echo "  open      http://$(DEMO_ADDR)/"
	@echo "  subscribe curl -N 'http://$(DEMO_ADDR)/events?topic=default'"
	@echo "  publish   curl -X POST 'http://$(DEMO_ADDR)/publish?topic=default' -d hi"
	@echo "  stop      make demo-stop"

demo-stop:
	@if [ -f $(BUILD)/pushletd.pid ]; then \
	  kill $$(cat $(BUILD)/pushletd.pid) 2>/dev/null || true; rm -f $(BUILD)/pushletd.pid; fi

# Every suite: unit + integration on a normal build, again under ASan+UBSan, the cross-thread
# tests under TSan, and each fuzz target for a bounded time.
test: test-deps
	@$(MAKE) --no-print-directory test-unit test-integration test-python soak
	@$(MAKE) --no-print-directory test-asan soak-asan
	@$(MAKE) --no-print-directory test-tsan
	@$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=$(FUZZ_SECONDS)

test-deps:
	@.ci/install-deps.sh test

test-unit: build
	@cd $(BUILD) && ctest --output-on-failure -j$(JOBS)

test-integration: build
	@PUSHLETD=$(CURDIR)/$(BUILD)/bin/pushletd $(PYTHON) -m pytest -q tests/integration tests/browser

# The Python binding, built offline in a venv with Debian's Python (bindings/python/README.md).
test-python: build
	@bindings/python/run_tests.sh $(BUILD)/python-venv

test-asan:
	@$(MAKE) --no-print-directory test-unit test-integration BUILD=$(ASAN_BUILD) \
	  CMAKE_FLAGS="-DPUSHLET_SANITIZE=address -DPUSHLET_BUILD_BENCH=OFF"

# 20,000 connections opened and dropped every way while publishing (tests/soak/README.md); the
# short run under ASan is the LeakSanitizer check.
soak: build
	@$(PYTHON) tests/soak/churn.py --pushletd $(BUILD)/bin/pushletd

soak-asan:
	@cmake -S . -B $(ASAN_BUILD) -DPUSHLET_SANITIZE=address -DPUSHLET_BUILD_BENCH=OFF >/dev/null
	@cmake --build $(ASAN_BUILD) -j$(JOBS) --target pushletd
	@$(PYTHON) tests/soak/churn.py --pushletd $(ASAN_BUILD)/bin/pushletd --short

soak-valgrind: build
	@$(PYTHON) tests/soak/churn.py --pushletd $(BUILD)/bin/pushletd --short --valgrind

test-tsan: deps
	@cmake -S . -B $(TSAN_BUILD) -DPUSHLET_SANITIZE=thread -DPUSHLET_BUILD_BENCH=OFF >/dev/null
	@cmake --build $(TSAN_BUILD) -j$(JOBS)
	@cd $(TSAN_BUILD) && ctest --output-on-failure -L tsan

fuzz: deps
	@CC=clang cmake -S . -B $(FUZZ_BUILD) -DPUSHLET_BUILD_FUZZ=ON -DPUSHLET_SANITIZE=address \
	  -DPUSHLET_BUILD_TESTS=OFF -DPUSHLET_BUILD_BENCH=OFF >/dev/null
	@cmake --build $(FUZZ_BUILD) -j$(JOBS)
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_BUILD)/corpus-$$t tests/fuzz/corpus/$$t; \
	  if $(FUZZ_BUILD)/bin/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -print_final_stats=1 \
	       $(FUZZ_BUILD)/corpus-$$t tests/fuzz/corpus/$$t >$(FUZZ_BUILD)/fuzz_$$t.log 2>&1; \
	  then echo "fuzz_$$t: $(FUZZ_SECONDS)s, $$(grep -o 'stat::number_of_executed_units: [0-9]*' \
	         $(FUZZ_BUILD)/fuzz_$$t.log | grep -o '[0-9]*$$') runs, no findings"; \
	  else tail -n 40 $(FUZZ_BUILD)/fuzz_$$t.log; echo "fuzz_$$t FAILED"; exit 1; fi; done

bench: build
	@.ci/install-deps.sh bench
	@PUSHLETD=$(CURDIR)/$(BUILD)/bin/pushletd PUSHLET_BENCH=$(CURDIR)/$(BUILD)/bin/pushlet-bench \
	  bench/run.sh

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD) $(FUZZ_BUILD)
