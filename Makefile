# Every target creates .venv when missing and installs the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-slow demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/python -m cnnkit demo

# every task's default model, plain PyTorch against cnnkit, one table (about 10 minutes on 2 CPU cores);
# writes it into BENCHMARKS.md between <!-- bench:begin KIND --> and <!-- bench:end KIND -->, KIND being
# cpu-amx-bf16, cpu-avx512-bf16 or cpu-avx2 (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 stands in for the latter)
bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py --task all --write

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
