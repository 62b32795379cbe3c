# Everything a fresh machine needs: `make demo` and `make test` set up .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup browser test demo bench bench-preference bench-serve bench-scale bench-precision clean

setup: $(STAMP)

# llama-cpp-python (a test dependency: the GGUF tests load our files in llama.cpp) has no wheel on PyPI
# and builds from source; these flags keep that build to the CPU library the tests use (no multimodal
# library, no BLAS, no GPU backends), and to the same x86-64 code on every host: AVX2, not -march=native.
# A native build on a Sapphire Rapids host enables ggml's AMX backend, which crashes (SIGSEGV in
# llama_decode) on our q8_0 files (ggml-org/llama.cpp#20824). --no-cache-dir: pip's wheel cache does
# not key on CMAKE_ARGS, so a wheel built natively on another host could come back.
LLAMA_CPP_PIN    := $(shell grep -o '"llama-cpp-python==[^"]*"' pyproject.toml | tr -d '"')
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF \
	-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

# torch is pinned and installed first: the pin takes the local CPU build; a looser
# requirement would pull several GB of CUDA wheels.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet --no-cache-dir '$(LLAMA_CPP_PIN)'
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The playground's test drives Debian's chromium (Playwright with executable_path, no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null; } || echo "warning: could not install chromium (apt-get, as root); the browser test will be skipped"

# `--dtype auto` picks bf16 on CPUs with fast bf16 matmuls (AMX / AVX-512-BF16) and fp32 elsewhere.
# The suite runs under this CPU's policy, then the tests that go through `auto` (marker auto_dtype)
# again under the other one (LORAKIT_CPU_BF16 overrides the check), so both pass on every host.
OTHER_POLICY := $(shell grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && echo 0 || echo 1)

# The suite: a worker per core (pytest-xdist), one thread each; the slow tests go out first (tests/conftest.py).
# The second pass is a few fast tests: one process (workers would cost more to start than they save).
test: $(STAMP) browser
	$(BIN)/python -m pytest --numprocesses logical --dist load
	LORAKIT_CPU_BF16=$(OTHER_POLICY) $(BIN)/python -m pytest -m auto_dtype

demo: $(STAMP)
	$(BIN)/lorakit demo

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-preference: $(STAMP)
	$(BIN)/python benchmarks/preference.py

bench-serve: $(STAMP)
	$(BIN)/python benchmarks/serve.py

# Real sizes (Qwen2-0.5B and Llama-2-7B shapes, random weights, ~14 GB of disk): hours on 2 cores.
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/scale.py

# bf16 against fp32 on this CPU, path by path (training and decoding; the 0.5B shape when scale.py cached it).
bench-precision: $(STAMP)
	$(BIN)/python benchmarks/precision.py $(if $(wildcard $(HOME)/.cache/lorakit-bench/qwen2-0.5b/config.json),--base $(HOME)/.cache/lorakit-bench/qwen2-0.5b)

clean:
	rm -rf $(VENV) build src/*.egg-info
