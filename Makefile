# nccl-ep-rs: build, install and test libnccl_ep.so (see docs/BUILDING.md).
#
#   make build                      cargo build --release -> target/release/libnccl_ep.so
#   make header                     regenerate include/*.h (cbindgen, src/abi) and kernels/ep_params.cuh (src/runtime/kernel_abi.rs)
#   make install PREFIX=/opt/x      lib/libnccl_ep.so.0.1.0 (+ .so.0, .so), include/, pkg-config, CMake package
#   make test                       deps, cargo tests, C tests (ctest); last line "N passed, M failed, K skipped"
#                                   (GPU tests are #[ignore]d: K without a GPU; NCCL_EP_GPU_TESTS=1 runs them)
#   make bench                      the benchmark (needs an NVIDIA GPU)
#   make fuzz FUZZ_SECONDS=N        the ABI fuzzer (c-tests/fuzz_abi.c) for N s (default 60); no GPU
#   make clean
CARGO ?= cargo
PREFIX ?= /usr/local
# install: the library to install (default: build and install target/release/libnccl_ep.so)
NCCL_EP_LIB ?=

.PHONY: all build header install test ctest deps bench fuzz clean
all: build

build:
	$(CARGO) build --release

header:
	NCCL_EP_BLESS=1 $(CARGO) test --test header --test kernel_params

install:
ifeq ($(strip $(NCCL_EP_LIB)),)
	$(CARGO) build --release
	scripts/install.sh "$(PREFIX)" target/release/libnccl_ep.so
else
	scripts/install.sh "$(PREFIX)" "$(NCCL_EP_LIB)"
endif

deps:
	scripts/deps.sh

# Everything; exits non-zero on any failure.
test:
	scripts/run_tests.sh

# Only the C tests (after make build and scripts/deps.sh).
ctest:
	NCCL_EP_SKIP_CARGO=1 scripts/run_tests.sh

bench:
	@scripts/bench.sh

# The ABI fuzzer: FUZZ_SECONDS (default 60), FUZZ_CALLS, FUZZ_SEED, FUZZ_VERBOSE=1 (scripts/fuzz.sh).
fuzz:
	@FUZZ_SECONDS="$(FUZZ_SECONDS)" FUZZ_CALLS="$(FUZZ_CALLS)" FUZZ_SEED="$(FUZZ_SEED)" scripts/fuzz.sh

clean:
	$(CARGO) clean
	rm -rf build
